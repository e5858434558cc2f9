from minidiff.models.clip import CLIPTextConfig, CLIPTextModel
