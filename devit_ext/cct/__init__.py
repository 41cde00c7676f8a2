"""CCT, the third backbone: `CCT` (teacher, timm conventions), `SubCCT` (a device's model in a DeViT), the
published variants registered with timm (importing this package registers them), configs and costs."""
from . import registry  # noqa: F401 - registers the variants with timm
from .model import CCT, SubCCT, sine_embedding, teacher_config
from .shapes import flops, make_config, params, seq_len

__all__ = ["CCT", "SubCCT", "make_config", "teacher_config", "flops", "params", "seq_len", "sine_embedding"]
