from minidiff.schedulers.base import SchedulerMixin, SchedulerOutput
from minidiff.schedulers.ddim import DDIMScheduler
from minidiff.schedulers.ddim_inverse import DDIMInverseScheduler
from minidiff.schedulers.ddpm import DDPMScheduler
from minidiff.schedulers.pndm import PNDMScheduler
