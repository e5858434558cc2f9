from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddim_inverse import DDIMInverseScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.dpm_solver import DPMSolverMultistepScheduler
from minidiff.schedulers.euler import EulerDiscreteScheduler
from minidiff.schedulers.euler_ancestral import EulerAncestralDiscreteScheduler
from minidiff.schedulers.lms import LMSDiscreteScheduler
from minidiff.schedulers.pndm import PNDMScheduler
from minidiff.schedulers.names import by_name
from minidiff.schedulers.heun import HeunDiscreteScheduler
from minidiff.schedulers.kdpm2 import KDPM2DiscreteScheduler
from minidiff.schedulers.kdpm2_ancestral import KDPM2AncestralDiscreteScheduler
from minidiff.schedulers.lcm import LCMScheduler
from minidiff.schedulers.tcd import TCDScheduler
