"""engram_jax: Engram conditional memory (hashed n-gram tables) in JAX/Flax."""
from setuptools import find_packages, setup

CORE = ["jax>=0.4.35", "flax>=0.10", "numpy>=1.26", "optax>=0.2.4"]
# etils.epath: workdirs and tokenizers on gs:// (engram_jax/paths.py)
DATA = ["grain>=0.2.10", "tokenizers>=0.20", "tensorflow-datasets>=4.9.7",
        "array_record>=0.7", "importlib_resources", "absl-py", "scikit-learn>=1.3",
        "etils[epath]>=1.5"]
# clu: the per-parameter table a run logs at INFO (`--verbosity=0`); not its metric
# writers, which import TensorFlow. tensorboard: the Event protos engram_jax/writers.py writes.
TRAIN = DATA + ["orbax-checkpoint>=0.11", "clu>=0.0.12", "ml_collections>=1.0",
                 "tensorflow-cpu>=2.16", "tensorboard", "matplotlib>=3.7"]

setup(
    name="engram_jax",
    version="0.1.0",
    description="Engram conditional memory (hashed n-gram tables) for JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # configs/ sits at the top of the checkout and installs as engram_jax.configs
    packages=find_packages(include=["engram_jax", "engram_jax.*"]) + ["engram_jax.configs"],
    package_dir={"engram_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "train": TRAIN,
        # nbclient + ipykernel execute colab/ notebooks in the tests
        "test": TRAIN + ["pytest>=8", "pytest-xdist>=3.5", "nbclient>=0.10", "nbformat>=5.9", "ipykernel>=6.29"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
    },
)
