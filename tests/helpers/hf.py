"""Reading Hugging Face checkpoint directories in tests."""
import glob
import os

from safetensors.torch import load_file


def tensors(d) -> dict:
    """name -> tensor over every *.safetensors file in directory `d`."""
    out = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        out.update(load_file(f))
    return out
