"""The float64 attention reference the CPU attention kernels' tests (bf16 and float32) compare with."""
import torch


def reference(q, k, v, scale, g):
    """float64 attention output, base-2 log-sum-exp of the scaled logits, and dq, dk, dv for output gradient g."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    logits = (q @ k.transpose(-1, -2)) * scale
    out = logits.softmax(-1) @ v
    out.backward(g.double())
    lse2 = torch.logsumexp(logits.detach(), -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
    return out.detach(), lse2, q.grad, k.grad, v.grad


def rel(a, b):
    """Relative error of a against the reference b (Frobenius norms)."""
    return ((a.double() - b).norm() / b.norm()).item()


def assert_as_close_as_pytorch(got: dict, q, k, v, g, scale, refs, pytorch_attention, bound: float, slack: float):
    """Each of got's 'out', 'dq', 'dk', 'dv' is within `bound` of the float64 reference `refs` (that
    order), and no more than twice as far from it as `pytorch_attention(q, k, v, scale)` with
    autograd is (plus `slack`). With one key the softmax is constant: dq and dk must then be ~0."""
    qt, kt, vt = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    pt = pytorch_attention(qt, kt, vt, scale)
    pt.backward(g)
    theirs = {"out": pt, "dq": qt.grad, "dk": kt.grad, "dv": vt.grad}
    for name, ref in zip(("out", "dq", "dk", "dv"), refs):
        if ref.norm() == 0:
            assert got[name].abs().max().item() < bound, name
            continue
        err, peer = rel(got[name], ref), rel(theirs[name], ref)
        assert err < bound and err < 2 * peer + slack, (name, err, peer)
