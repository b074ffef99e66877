"""Check an `rfft export` the way other tools will read it (needs torch + diffusers, offline):

    python scripts/check_controlnet_export.py EXPORT_FOLDER EXPORT.safetensors

loads the diffusers-layout export with `ControlNetModel.from_pretrained` and the single-file
export (`--format single-file`) with `ControlNetModel.from_single_file` (the loader ComfyUI-style
files go through in diffusers), and requires every tensor and every residual to be equal.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from diffusers import ControlNetModel


def main(folder, single):
    a = ControlNetModel.from_pretrained(folder).eval()
    b = ControlNetModel.from_single_file(single, config=folder, local_files_only=True).eval()
    # from_single_file leaves the weights in the file's memory map, at offsets that change which
    # vectorised kernels PyTorch picks (outputs then differ by ~1e-7); fresh copies compare the
    # networks themselves.
    for m in (a, b):
        for p in m.parameters():
            p.data = p.data.clone()
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), sorted(set(sa) ^ set(sb))[:5]
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"
    torch.manual_seed(0)
    cfg = a.config
    x = torch.randn(1, cfg.in_channels, 8, 8)
    ctx = torch.randn(1, 77, cfg.cross_attention_dim)
    cond = torch.rand(1, cfg.conditioning_channels, 64, 64)
    with torch.no_grad():
        da, ma = a(x, 500, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
        db, mb = b(x, 500, encoder_hidden_states=ctx, controlnet_cond=cond, return_dict=False)
    assert all(torch.equal(p, q) for p, q in zip(da, db)) and torch.equal(ma, mb), "residuals differ"
    print(f"{single}: {len(sa)} tensors and all {len(da) + 1} residuals equal to {folder} (exact)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
