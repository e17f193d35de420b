"""Studies: analyses and experiments run on trained workdirs (imports the training side
lazily; the core never imports this package)."""
import os as _os

# tensorflow-datasets loads TensorFlow: keep its start-up chatter off the study commands' output
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
