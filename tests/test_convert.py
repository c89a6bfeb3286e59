"""Weights made by others (issue 2): Hugging Face ViT conversion checked against the HF
model itself, and checkpoint files in timm, Hugging Face, vit_jax and big_vision layouts,
written here from those formats' documented names with mappings independent of vitlab's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import vitlab
from vitlab import CheckpointError, ConfigError, from_transformers, load_weights
from vitlab.flops import count_params
from vitlab.models import VisionTransformer, resample_abs_pos_embed

transformers = pytest.importorskip("transformers")
from transformers import ViTConfig, ViTForImageClassification, ViTModel  # noqa: E402


def randomise(module: torch.nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Every parameter random (LayerNorm scales and all biases too), so that any mapping
    error (a swapped q/k, a missing transpose, a dropped bias) changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def hf_vit(cls=ViTForImageClassification, **cfg):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_labels=5)
    base.update(cfg)
    add = {} if cls is ViTForImageClassification else {"add_pooling_layer": cfg.pop("add_pooling_layer", True)}
    base.pop("add_pooling_layer", None)
    model = cls(ViTConfig(**base), **add).eval()
    randomise(model)
    return model


# ----------------------------------------------------------------------------- Hugging Face ViT
@pytest.mark.parametrize("cfg, size", [
    (dict(), (32, 32)),  # HF defaults: qkv bias, eps 1e-12
    (dict(qkv_bias=False, layer_norm_eps=1e-6, image_size=[32, 48], num_channels=1, intermediate_size=48),
     (32, 48)),  # no qkv bias, non-square image, grey input, MLP ratio 1.5
    (dict(hidden_size=24, num_attention_heads=3, intermediate_size=72, image_size=28, patch_size=7, num_labels=4),
     (28, 28)),  # another patch size and width
])
def test_converted_hf_vit_gives_the_same_logits(cfg, size):
    hf = hf_vit(**cfg)
    ours = from_transformers(hf)
    assert isinstance(ours, VisionTransformer)
    assert (ours.blocks[0].attn.qkv.bias is not None) == hf.config.qkv_bias
    x = torch.randn(3, hf.config.num_channels, *size)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=False)
        hidden = hf.vit(x).last_hidden_state
        logits = ours(x)
        tokens = ours.forward_features(x)
    assert (logits - ref.logits).abs().max() < 1e-4
    assert (tokens - hidden).abs().max() < 1e-4
    assert ref.logits.abs().max() > 0.1  # a non-trivial function was compared
    assert count_params(ours) == count_params(hf)


def test_converted_hf_vit_with_global_average_pooling():
    # HF has no GAP option: the reference is HF's classifier on the mean of its normalised
    # patch tokens (class token excluded), the paper's GAP.
    hf = hf_vit(qkv_bias=False)
    ours = from_transformers(hf, global_pool="avg")
    assert ours.global_pool == "avg" and ours.num_prefix_tokens == 1
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = hf.vit(x).last_hidden_state
        ref = hf.classifier(tokens[:, 1:].mean(dim=1))
        assert (ours(x) - ref).abs().max() < 1e-4
        assert (ours(x) - hf(x).logits).abs().max() > 1e-3  # really a different pooling


def test_converted_hf_vit_model_backbone_and_pooler():
    hf = hf_vit(ViTModel, add_pooling_layer=True)
    ours = from_transformers(hf)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = hf(x)
        assert (ours.forward_features(x) - out.last_hidden_state).abs().max() < 1e-4
        assert (ours(x) - out.pooler_output).abs().max() < 1e-4  # pooler = dense + tanh = pre-logits head
    bare = hf_vit(ViTModel, add_pooling_layer=False)
    ours = from_transformers(bare, global_pool="avg")
    with torch.no_grad():
        tokens = bare(x).last_hidden_state
        assert (ours(x) - tokens[:, 1:].mean(1)).abs().max() < 1e-4


def test_hf_position_interpolation_matches_ours_when_upsampling():
    hf = hf_vit()  # 32 px, grid 4 x 4
    dynamic = from_transformers(hf, dynamic_img_size=True)
    resized = from_transformers(hf, img_size=(48, 64))  # set_input_size path
    x = torch.randn(2, 3, 48, 64)  # grid 6 x 8, non-square
    with torch.no_grad():
        ref = hf(x, interpolate_pos_encoding=True).logits
        assert (dynamic(x) - ref).abs().max() < 1e-4
        assert (resized(x) - ref).abs().max() < 1e-4
        assert (dynamic(torch.zeros(1, 3, 32, 32)) - hf(torch.zeros(1, 3, 32, 32)).logits).abs().max() < 1e-4
    # Downsampling differs by design: vitlab resamples with antialiasing (a smaller grid averages
    # neighbours instead of skipping them), HF's interpolate_pos_encoding does not. Equivalence
    # there is shown against a HF model built at the small size with vitlab's resampled table.
    small_cfg = hf.config.to_dict()
    small_cfg.update(image_size=16)
    small = ViTForImageClassification(ViTConfig(**small_cfg)).eval()
    sd = hf.state_dict()
    sd["vit.embeddings.position_embeddings"] = resample_abs_pos_embed(
        sd["vit.embeddings.position_embeddings"], (2, 2), (4, 4), num_prefix_tokens=1)
    small.load_state_dict(sd)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (dynamic(x) - small(x).logits).abs().max() < 1e-4


def test_parameter_count_equals_hf_at_real_size():
    # an independent implementation of ViT-B/16 at 224 px and 1000 classes
    with torch.device("meta"):
        hf = ViTForImageClassification(ViTConfig(num_labels=1000))
        ours = vitlab.create_model("vit_b16", num_classes=1000, img_size=224)
    assert count_params(ours) == count_params(hf) == 86_567_656


def test_unsupported_models_and_options_are_refused():
    with pytest.raises(ConfigError, match=r"cannot convert a Linear.*ViTForImageClassification, ViTModel, "
                                          r"CvtForImageClassification, CvtModel"):
        from_transformers(torch.nn.Linear(2, 2))
    mim = transformers.ViTForMaskedImageModeling(ViTConfig(hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64,
                                                           image_size=32, patch_size=8, encoder_stride=8))
    with pytest.raises(ConfigError, match=r"cannot convert a ViTForMaskedImageModeling.*Did you mean"):
        from_transformers(mim)
    with pytest.raises(ConfigError, match=r"no option 'embed_dim'"):
        from_transformers(hf_vit(), embed_dim=64)
    with pytest.raises(ConfigError, match=r"hidden_act='gelu_new'"):
        from_transformers(hf_vit(hidden_act="gelu_new"))


def test_cvt_is_dispatched_to_the_cvt_module():
    cvt = pytest.importorskip("vitlab.models.cvt")
    if not hasattr(cvt, "convert_hf_cvt"):
        pytest.skip("vitlab.models.cvt.convert_hf_cvt is not written yet")
    from transformers import CvtConfig, CvtForImageClassification

    # (HF indexes its per-stage drop-path list by the stage number: stage s needs depth > s)
    cfg = CvtConfig(num_labels=3, embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3])
    hf = CvtForImageClassification(cfg).eval()
    ours = from_transformers(hf)
    assert not isinstance(ours, VisionTransformer) and not ours.training  # eval: batch norm on running stats
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------- checkpoint files
def tiny(**kw) -> VisionTransformer:
    cfg = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4, head="mlp_tanh")
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def timm_state_dict(m: VisionTransformer) -> dict:
    """timm's names, written out from timm's VisionTransformer attribute layout."""
    sd = {"patch_embed.proj.weight": m.patch_embed.proj.weight, "patch_embed.proj.bias": m.patch_embed.proj.bias,
          "cls_token": m.cls_token, "pos_embed": m.pos_embed,
          "norm.weight": m.norm.weight, "norm.bias": m.norm.bias,
          "pre_logits.fc.weight": m.pre_logits[0].weight, "pre_logits.fc.bias": m.pre_logits[0].bias,
          "head.weight": m.head.weight, "head.bias": m.head.bias}
    for i, b in enumerate(m.blocks):
        for name, mod in (("norm1", b.norm1), ("attn.qkv", b.attn.qkv), ("attn.proj", b.attn.proj),
                          ("norm2", b.norm2), ("mlp.fc1", b.mlp.fc1), ("mlp.fc2", b.mlp.fc2)):
            sd[f"blocks.{i}.{name}.weight"] = mod.weight
            sd[f"blocks.{i}.{name}.bias"] = mod.bias
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def npz_arrays(m: VisionTransformer, flavour: str) -> dict:
    """The Flax parameter tree of the same network, flattened with '/' as the Google
    checkpoints store it: kernels (in, out), the patch kernel HWIO, attention kernels
    (D, heads, head_dim) and (heads, head_dim, D)."""
    a = lambda t: t.detach().numpy().astype(np.float32)  # noqa: E731
    dim, heads = m.embed_dim, m.blocks[0].attn.num_heads
    hd = dim // heads
    w = {"embedding/kernel": a(m.patch_embed.proj.weight.permute(2, 3, 1, 0)),
         "embedding/bias": a(m.patch_embed.proj.bias),
         "Transformer/encoder_norm/scale": a(m.norm.weight), "Transformer/encoder_norm/bias": a(m.norm.bias),
         "pre_logits/kernel": a(m.pre_logits[0].weight.T), "pre_logits/bias": a(m.pre_logits[0].bias),
         "head/kernel": a(m.head.weight.T), "head/bias": a(m.head.bias)}
    if m.cls_token is not None:  # (vit_jax 'gap' models have none)
        w["cls"] = a(m.cls_token)
    if flavour == "vit_jax":
        w["Transformer/posembed_input/pos_embedding"] = a(m.pos_embed)
        mha, ln2, mlp = "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    else:  # big_vision: no position for the class token; other module numbering
        w["pos_embedding"] = a(m.pos_embed[:, 1:])
        mha, ln2, mlp = "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    blocks = []
    for b in m.blocks:
        qw, kw, vw = b.attn.qkv.weight.split(dim, 0)
        qb, kb, vb = b.attn.qkv.bias.split(dim, 0)
        blk = {"LayerNorm_0/scale": a(b.norm1.weight), "LayerNorm_0/bias": a(b.norm1.bias),
               f"{ln2}/scale": a(b.norm2.weight), f"{ln2}/bias": a(b.norm2.bias),
               f"{mlp}/Dense_0/kernel": a(b.mlp.fc1.weight.T), f"{mlp}/Dense_0/bias": a(b.mlp.fc1.bias),
               f"{mlp}/Dense_1/kernel": a(b.mlp.fc2.weight.T), f"{mlp}/Dense_1/bias": a(b.mlp.fc2.bias),
               f"{mha}/out/kernel": a(b.attn.proj.weight.T.reshape(heads, hd, dim)),
               f"{mha}/out/bias": a(b.attn.proj.bias)}
        for n, wt, bs in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            blk[f"{mha}/{n}/kernel"] = a(wt.T.reshape(dim, heads, hd))
            blk[f"{mha}/{n}/bias"] = a(bs.reshape(heads, hd))
        blocks.append(blk)
    if flavour == "big_vision_scan":  # nn.scan stacks the blocks along a leading axis
        for k in blocks[0]:
            w[f"Transformer/encoderblock/{k}"] = np.stack([blk[k] for blk in blocks])
    else:
        for i, blk in enumerate(blocks):
            w.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    return w


def source_model(**kw) -> VisionTransformer:
    m = tiny(**kw)
    randomise(m, std=0.2, seed=1)
    return m


def assert_same_network(a, b, size=(16, 16)):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
        assert a(x).abs().max() > 0.1


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_layout_round_trip(tmp_path, suffix):
    src = source_model()
    sd = timm_state_dict(src)
    path = tmp_path / f"vit{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:  # a training checkpoint from DDP: weights nested and 'module.'-prefixed
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    dst = tiny()
    result = load_weights(dst, path)
    assert result.format == "timm" and not (result.missing or result.unexpected or result.mismatched)
    assert_same_network(src, dst)


def test_vitlab_state_dict_round_trip(tmp_path):
    src = source_model(head="linear", pos_embed="learned_2d", qkv_bias=False)
    torch.save(src.state_dict(), tmp_path / "own.pt")
    dst = tiny(head="linear", pos_embed="learned_2d", qkv_bias=False)
    load_weights(dst, tmp_path / "own.pt")
    assert_same_network(src, dst)


@pytest.mark.parametrize("flavour", ["vit_jax", "big_vision", "big_vision_scan"])
def test_google_npz_round_trip(tmp_path, flavour):
    src = source_model()
    if flavour != "vit_jax":
        with torch.no_grad():
            src.pos_embed[:, 0] = 0  # big_vision gives the class token no position
    path = tmp_path / "vit.npz"
    np.savez(path, **npz_arrays(src, flavour))
    dst = tiny()
    result = load_weights(dst, path)
    assert result.format.startswith("npz")
    assert_same_network(src, dst)


def test_hf_layout_file_loads(tmp_path):
    from safetensors.torch import save_file

    from vitlab.models.convert import vit_kwargs_from_hf_config

    hf = hf_vit(qkv_bias=False)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"))
    ours = VisionTransformer(**vit_kwargs_from_hf_config(hf.config, num_classes=5)).eval()
    assert load_weights(ours, tmp_path / "model.safetensors").format == "Hugging Face"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() < 1e-4


def test_checkpoint_at_another_grid_is_resampled(tmp_path):
    src = source_model()  # 16 px: grid 4 x 4
    np.savez(tmp_path / "vit.npz", **npz_arrays(src, "vit_jax"))
    dst = tiny(img_size=24)  # grid 6 x 6
    result = load_weights(dst, tmp_path / "vit.npz")
    assert result.resampled == ["pos_embed"]
    assert dst.pos_embed.shape == (1, 37, 32)
    src.dynamic_img_size = src.patch_embed.dynamic_img_size = True  # resamples on the fly, same function
    assert_same_network(src, dst, size=(24, 24))


def test_mismatched_keys_are_listed(tmp_path):
    sd = timm_state_dict(source_model())
    del sd["blocks.0.norm1.weight"]
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(96, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny(), tmp_path / "bad.pth")
    msg = str(e.value)
    assert str(tmp_path / "bad.pth") in msg
    assert "missing keys (1): blocks.0.norm1.weight" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg

    torch.save(timm_state_dict(source_model()), tmp_path / "five.pth")
    seven = tiny(num_classes=7)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(2\): head.weight checkpoint \(5, 32\) vs model "
                                              r"\(7, 32\).*num_classes=5.*strict=False"):
        load_weights(seven, tmp_path / "five.pth")
    # strict=False loads everything else and reports the head
    result = load_weights(seven, tmp_path / "five.pth", strict=False)
    assert [m.split(":")[0] for m in result.mismatched] == ["head.weight", "head.bias"]
    torch.testing.assert_close(seven.blocks[1].mlp.fc2.weight, source_model().blocks[1].mlp.fc2.weight)

    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): pre_logits.0.weight, pre_logits.0.bias"
                                              r".*head='mlp_tanh'"):
        load_weights(tiny(head="linear"), tmp_path / "five.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(12\): blocks\.1\.\*.*has 2 blocks, the model 1"):
        load_weights(tiny(depth=1), tmp_path / "five.pth")


def test_position_table_of_another_layout_is_explained(tmp_path):
    # a GAP checkpoint (no class token, 4 x 4 grid) loaded into a class-token model
    src = source_model(global_pool="avg")
    np.savez(tmp_path / "gap.npz", **npz_arrays(src, "vit_jax"))
    with pytest.raises(CheckpointError, match=r"16 entries = 1 prefix.*15 grid positions.*class_token=False"):
        load_weights(tiny(), tmp_path / "gap.npz")
    dst = tiny(global_pool="avg")
    load_weights(dst, tmp_path / "gap.npz")
    assert_same_network(src, dst)
    # another width: reported with the other shape mismatches, not resampled
    torch.save(timm_state_dict(source_model()), tmp_path / "w32.pth")
    with pytest.raises(CheckpointError, match=r"pos_embed checkpoint \(1, 17, 32\) vs model \(1, 17, 48\)"):
        load_weights(tiny(embed_dim=48), tmp_path / "w32.pth")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".npz"])
def test_corrupt_files_raise_checkpoint_errors_naming_the_path(tmp_path, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint") as e:
        load_weights(tiny(), path)
    assert str(path) in str(e.value)
    # a truncated real file, too
    good = tmp_path / f"good{suffix}"
    sd = timm_state_dict(source_model())
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(good))
    elif suffix == ".pth":
        torch.save(sd, good)
    else:
        np.savez(good, **npz_arrays(source_model(), "vit_jax"))
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_weights(tiny(), path)
    assert str(path) in str(e.value)


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tiny(), tmp_path / "nowhere.safetensors")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type '.h5'.*\.safetensors, \.pth"):
        load_weights(tiny(), tmp_path / "w.h5")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_weights(tiny(), tmp_path / "list.pth")
