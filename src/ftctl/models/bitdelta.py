"""Loading a BitDelta folder (written by ``ftctl quantize method=bitdelta``): the base plus scale x sign per
linear layer."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ftctl.core.errors import RunDirError

BITDELTA_FILE = "bitdelta.json"


def load_bitdelta(folder: Path, dtype=None):
    """Rebuild a model from a BitDelta folder: the base plus scale x sign per linear layer."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    meta = json.loads((folder / BITDELTA_FILE).read_text())
    base_path = Path(meta["base"])
    if not (base_path / "config.json").is_file():
        raise RunDirError(f"{folder}: its base model {base_path} is gone (BitDelta stores only the difference)")
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype or torch.float32, use_safetensors=True)
    tensors = load_file(str(folder / "bitdelta.safetensors"))
    sd = model.state_dict()
    with torch.no_grad():
        for name, shape in meta["linears"].items():
            n = math.prod(shape)
            bits = np.unpackbits(tensors[f"{name}.sign"].numpy())[:n]
            sign = torch.from_numpy(bits.astype(np.float32) * 2 - 1).reshape(shape)
            w = sd[f"{name}.weight"]
            w.add_((tensors[f"{name}.scale"].float() * sign).to(w.dtype))
        for k in meta["full"]:
            sd[k].copy_(tensors[f"{k}.full"])
    return model
