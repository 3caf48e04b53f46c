"""megatron-m2: a megatron-core trainer for bilingual (Chinese + English) M2-Encoder image-text encoders."""
import warnings

__version__ = "0.1.0"

# megatron-core says, from several modules and in every process, that TransformerEngine / apex are missing and it
# falls back to PyTorch: the expected state on CPU and with --spec local (the trainer logs the layer spec it uses).
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (is|are) not installed",
                        category=UserWarning)
