"""vitlab's and the peer's bf16 inference steps for one model, prepared as `vitlab.bench.run_benchmark`
prepares them (batch 32, 224 px; the peer from `transformers`, or for ConvMixer the paper's definition in
plain PyTorch as the speed table has it; channels-last where it has depthwise convolutions), for the
experiments that time the two outside `run_benchmark`."""
from __future__ import annotations

import torch


def inference_steps(model: str, batch_size: int = 32, img_size: int = 224):
    """(vitlab step, peer step): callables that run one inference step each."""
    from vitlab import bench
    from vitlab.models.registry import get_spec

    torch.manual_seed(0)
    cpu = torch.device("cpu")
    name = get_spec(model).name
    pair = bench.build_pair(name, "paper" if name.startswith("convmixer") else "transformers", 1000, img_size)
    x, y = torch.randn(batch_size, 3, img_size, img_size), torch.randint(0, 1000, (batch_size,))
    ours = bench.prepare(pair.ours, "infer", torch.bfloat16, cpu, True, False)
    step_ours = bench.make_step(ours, ours, "infer", x, y, dtype=torch.bfloat16, fast=True, device=cpu,
                                optimizer="foreach")
    peer, x_peer = pair.peer.eval(), x
    if any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 for m in peer.modules()):
        peer.to(memory_format=torch.channels_last)  # as run_benchmark gives the peer (CvT's depthwise convs)
        x_peer = x.contiguous(memory_format=torch.channels_last)
    step_peer = bench.make_step(pair.peer_forward, peer, "infer", x_peer, y, dtype=torch.bfloat16, fast=False,
                                device=cpu, optimizer="fused")
    return step_ours, step_peer
