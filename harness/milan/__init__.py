"""The shared MILAN implementation: student, decoders, masks, CLIP teacher, losses.

Free of configuration files, launching and logging: plain arguments in, tensors out.
"""

from harness.milan.weights import build_timm_vit, load_encoder_into_timm, read_state_dict
from harness.milan.model import MaskedAutoencoderViT, build_student
from harness.milan.pretrainer import MilanPretrainer, PretrainOutput, build_pretrainer, needs_teacher
from harness.milan.presets import PRESETS, VitShape
from harness.milan.teacher import ClipTeacher, TeacherOutput, build_teacher

__all__ = [
    "PRESETS", "ClipTeacher", "MaskedAutoencoderViT", "MilanPretrainer", "PretrainOutput",
    "TeacherOutput", "VitShape", "build_pretrainer", "build_student", "build_teacher",
    "build_timm_vit", "load_encoder_into_timm", "needs_teacher", "read_state_dict",
]
