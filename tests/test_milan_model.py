"""Pins the MILAN semantics of the shared model (see ../shared/docs/milan-spec.md)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from harness.core.errors import ConfigError
from harness.milan.model import build_student
from harness.milan.pretrainer import build_pretrainer
from harness.milan.teacher import build_teacher
from harness.milan.weights import build_timm_vit
from harness.milan.weights import load_encoder_into_timm, read_state_dict
from harness.milan.losses import clip_loss, patchify, pixel_loss
from harness.milan.masking import (binary_mask, num_visible, random_ids_shuffle,
                                   semantic_ids_shuffle, split_ids)
from harness.milan.presets import PRESETS

SIZE, IMG = "vit_micro_patch4", 32  # 8x8 grid, 64 patches


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return build_teacher("milan-clip-micro", None)


def micro(decoder="prompting", target="pixel", masking="random", teacher=None, **kw):
    torch.manual_seed(0)
    return build_pretrainer(size=SIZE, img_size=IMG, target=target, decoder=decoder,
                            masking=masking, mask_ratio=0.75, teacher=teacher, **kw)


# --- masking -----------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["random", "semantic"])
def test_masks_are_permutations_with_exact_visible_count(sampler):
    g = torch.Generator().manual_seed(0)
    n, length = 16, 196
    if sampler == "random":
        ids = random_ids_shuffle(n, length, torch.device("cpu"), g)
    else:
        ids = semantic_ids_shuffle(torch.rand(n, length, generator=g), g)
    assert torch.equal(ids.sort(dim=1).values, torch.arange(length).expand(n, -1))
    keep, masked, restore = split_ids(ids, 0.75)
    assert keep.shape == (n, 49) and masked.shape == (n, 147) == (n, length - num_visible(length, 0.75))
    # ids_restore inverts ids_shuffle: restoring the shuffled indices gives 0..L-1.
    assert torch.equal(torch.gather(ids, 1, restore), torch.arange(length).expand(n, -1))
    mask = binary_mask(restore, keep.shape[1])
    assert torch.equal(mask.sum(1), torch.full((n,), 147.0))
    assert torch.all(mask.gather(1, keep) == 0) and torch.all(mask.gather(1, masked) == 1)


def test_semantic_sampling_keeps_important_patches_far_more_often():
    g = torch.Generator().manual_seed(0)
    length, n = 64, 4000
    importance = torch.full((n, length), 0.002)
    importance[:, :8] = 0.1  # 8 high-importance patches
    keep, _, _ = split_ids(semantic_ids_shuffle(importance, g), 0.75)
    kept = torch.zeros(length).index_add_(0, keep.flatten(), torch.ones(keep.numel())) / n
    assert kept[:8].mean() > 0.9  # important patches are nearly always visible
    assert kept[8:].mean() < 0.2  # the rest only fill the remaining visible slots
    # random masks keep every patch about equally often
    keep_r, _, _ = split_ids(random_ids_shuffle(n, length, torch.device("cpu"), g), 0.75)
    kept_r = torch.zeros(length).index_add_(0, keep_r.flatten(), torch.ones(keep_r.numel())) / n
    assert (kept_r - 0.25).abs().max() < 0.05


# --- decoders ------------------------------------------------------------------------------

def _fixed_positions(ids_keep):
    return torch.cat([torch.zeros(ids_keep.shape[0], 1, dtype=torch.long), ids_keep + 1], dim=1)


def test_prompting_blocks_never_update_fixed_tokens():
    student = micro("prompting").student
    x = torch.randn(2, 3, IMG, IMG)
    ids = random_ids_shuffle(2, 64, torch.device("cpu"), torch.Generator().manual_seed(0))
    keep, masked, restore = split_ids(ids, 0.75)
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
             for blk in student.decoder_blocks]
    with torch.no_grad():
        latent = student.forward_encoder(x, keep)
        pred = student.forward_decoder(latent, keep, masked, restore)
    for h in hooks:
        h.remove()
    # every block received the same prompts: decoder_embed(latent) + positions
    pos = student.decoder_pos_embed.expand(2, -1, -1)
    fixed = student.decoder_embed(latent) + torch.gather(
        pos, 1, _fixed_positions(keep).unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
    assert len(seen) == len(student.decoder_blocks)
    for prompts in seen:
        torch.testing.assert_close(prompts, fixed)
    # and the fixed tokens' predictions come straight from norm + pred of those prompts
    expected = student.decoder_pred(student.decoder_norm(fixed))
    got = torch.gather(pred, 1, _fixed_positions(keep).unsqueeze(-1).expand(-1, -1, pred.shape[-1]))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("decoder, fixed_changes", [("prompting", False), ("standard", True)])
def test_mask_token_reaches_fixed_tokens_only_in_standard_decoder(decoder, fixed_changes):
    student = micro(decoder).student.eval()
    x = torch.randn(2, 3, IMG, IMG)
    ids = random_ids_shuffle(2, 64, torch.device("cpu"), torch.Generator().manual_seed(1))
    keep, _, _ = split_ids(ids, 0.75)
    idx = _fixed_positions(keep).unsqueeze(-1)
    with torch.no_grad():
        before, mask = student(x, ids)
        student.mask_token.add_(torch.randn_like(student.mask_token))
        after, _ = student(x, ids)
    fixed_before = torch.gather(before, 1, idx.expand(-1, -1, before.shape[-1]))
    fixed_after = torch.gather(after, 1, idx.expand(-1, -1, after.shape[-1]))
    assert torch.allclose(fixed_before, fixed_after) != fixed_changes
    masked_rows = mask.bool()
    assert not torch.allclose(before[:, 1:][masked_rows], after[:, 1:][masked_rows])


def test_prompting_block_has_the_standard_blocks_parameter_count():
    std = micro("standard").student.decoder_blocks[0]
    prm = micro("prompting").student.decoder_blocks[0]
    assert sum(p.numel() for p in std.parameters()) == sum(p.numel() for p in prm.parameters())


def test_prompting_decoder_costs_about_079x_standard_at_vit_b():
    """The paper's FLOP claim: ~8.4 vs ~10.7 GFLOPs per image (0.79x) for ViT-B, 75% masking."""
    flops = {}
    for decoder in ("standard", "prompting"):
        student = build_student("vit_base_patch16", img_size=224, decoder=decoder, pred_dim=512,
                                mask_ratio=0.75)
        latent = torch.randn(1, 50, 768)
        keep, masked, restore = split_ids(torch.randperm(196).unsqueeze(0), 0.75)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            student.forward_decoder(latent, keep, masked, restore)
        flops[decoder] = counter.get_total_flops() / 1e9
    assert 10.0 < flops["standard"] < 11.5 and 7.8 < flops["prompting"] < 9.0
    assert 0.74 < flops["prompting"] / flops["standard"] < 0.84


# --- losses --------------------------------------------------------------------------------

def test_patchify_roundtrip_and_order():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # first patch, first pixel: channels are innermost (p, q, c order)
    assert patches[0, 0, :3].tolist() == [imgs[0, 0, 0, 0], imgs[0, 1, 0, 0], imgs[0, 2, 0, 0]]
    grid = imgs.shape[-1] // 4  # MAE's unpatchify: [N, L, p*p*3] -> [N, 3, H, W]
    restored = torch.einsum("nhwpqc->nchpwq", patches.reshape(len(imgs), grid, grid, 4, 4, 3))
    assert torch.equal(restored.reshape(imgs.shape), imgs)


def test_pixel_loss_averages_over_masked_patches_only():
    pred = torch.zeros(1, 2, 4)
    target = torch.tensor([[[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]])
    mask = torch.tensor([[1.0, 0.0]])  # only the first patch is masked
    assert pixel_loss(pred, target, mask, norm_pix_loss=False).item() == pytest.approx(1.0)
    assert pixel_loss(pred, target, torch.tensor([[0.0, 1.0]]), False).item() == pytest.approx(4.0)
    # normalised: patch [0, 2, 0, 2] -> mean 1, unbiased var 4/3 -> (x - 1) / sqrt(4/3 + 1e-6)
    target = torch.tensor([[[0.0, 2.0, 0.0, 2.0], [5.0, 5.0, 5.0, 5.0]]])
    z = 1 / (4 / 3 + 1e-6) ** 0.5
    assert pixel_loss(pred, target, mask, norm_pix_loss=True).item() == pytest.approx(z**2, rel=1e-5)


def test_clip_loss_is_two_minus_two_cosine_over_all_tokens():
    pred = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]])  # [N=1, L+1=3, D=2]
    target = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]]])
    # cosines 1, 0, -1 -> losses 0, 2, 4 -> mean 2
    assert clip_loss(pred, target).item() == pytest.approx(2.0)


# --- teacher -------------------------------------------------------------------------------

def test_teacher_cls_target_is_open_clips_image_embedding(teacher):
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.create_model("milan-clip-micro").eval()
    t = build_teacher("milan-clip-micro", None)
    t.visual.load_state_dict(clip.visual.state_dict())
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        out = t(x)
        expected = clip.encode_image(x)
    assert out.targets.shape == (3, 65, 32) and out.importance.shape == (3, 64)
    torch.testing.assert_close(out.targets[:, 0], expected, atol=1e-5, rtol=1e-5)


def test_teacher_importance_is_the_last_blocks_cls_attention(teacher):
    x = torch.randn(3, 3, IMG, IMG)
    last = teacher.visual.transformer.resblocks[-1]
    captured = {}
    hook = last.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].clone()))
    out = teacher(x)
    hook.remove()
    h = last.ln_1(captured["x"])
    with torch.no_grad():  # reference: torch's own attention weights, averaged over heads
        _, weights = last.attn(h, h, h, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(out.importance, weights[:, 0, 1:], atol=1e-6, rtol=1e-5)
    assert teacher.training is False and not any(p.requires_grad for p in teacher.parameters())


def test_clip_normalisation_option_changes_teacher_input(teacher):
    x = torch.randn(2, 3, IMG, IMG)
    t_clip = build_teacher("milan-clip-micro", None, normalize="clip")
    t_clip.visual.load_state_dict(teacher.visual.state_dict())
    assert not torch.allclose(teacher(x).targets, t_clip(x).targets)


# --- checkpoints ---------------------------------------------------------------------------

def _reference_keys(depth, decoder_depth, prompting):
    """The MAE/MILAN reference names, written out from the spec."""
    block = ["norm1.weight", "norm1.bias", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
             "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    qkv = ["attn.qkv.weight", "attn.qkv.bias"]
    q_kv = ["attn.q.weight", "attn.q.bias", "attn.kv.weight", "attn.kv.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "decoder_embed.weight", "decoder_embed.bias", "mask_token",
            "decoder_pos_embed", "decoder_norm.weight", "decoder_norm.bias",
            "decoder_pred.weight", "decoder_pred.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block + qkv]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(decoder_depth)
             for k in block + (q_kv if prompting else qkv)]
    return set(keys)


@pytest.mark.parametrize("decoder", ["standard", "prompting"])
def test_reference_checkpoint_loads_strictly(tmp_path, decoder):
    student = build_student("vit_base_patch16", img_size=224, decoder=decoder, pred_dim=512,
                            mask_ratio=0.75)
    state = student.state_dict()
    assert set(state) == _reference_keys(12, 8, decoder == "prompting")
    assert state["decoder_blocks.0.attn.kv.weight" if decoder == "prompting"
                 else "decoder_blocks.0.attn.qkv.weight"].shape[0] in (1024, 1536)
    # a published checkpoint keeps the weights under "model"
    torch.save({"model": {k: torch.randn_like(v) for k, v in state.items()}, "epoch": 399},
               tmp_path / "milan.pth")
    fresh = build_student("vit_base_patch16", img_size=224, decoder=decoder, pred_dim=512,
                          mask_ratio=0.75)
    loaded = read_state_dict(tmp_path / "milan.pth")
    fresh.load_state_dict(loaded, strict=True)
    assert torch.equal(fresh.blocks[3].attn.qkv.weight, loaded["blocks.3.attn.qkv.weight"])


def test_encoder_loads_into_timm_vit_with_identical_features():
    import timm
    student = micro().student.eval()
    # naming: the ViT-B encoder's keys are exactly timm's vit_base_patch16_224 keys
    base = build_student("vit_base_patch16", img_size=224, decoder="prompting", pred_dim=512,
                         mask_ratio=0.75).state_dict()
    timm_keys = set(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict())
    assert {k for k in base if not k.startswith(("decoder", "mask_token"))} == timm_keys
    # numerics: with every patch visible the encoder equals timm's forward_features
    vit = build_timm_vit(SIZE, IMG).eval()
    load_encoder_into_timm(vit, student.state_dict())
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ours = student.forward_encoder(x, torch.arange(64).expand(2, -1))
        theirs = vit.forward_features(x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# --- every combination learns -------------------------------------------------------------

@pytest.mark.parametrize("target, decoder, masking",
                         list(itertools.product(["pixel", "clip"], ["standard", "prompting"],
                                                ["random", "semantic"])))
def test_every_combination_overfits_one_batch(teacher, target, decoder, masking):
    model = micro(decoder, target, masking, teacher)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    # smooth images, so masked patches are predictable from visible ones
    x = F.interpolate(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)), size=IMG,
                      mode="bilinear")
    losses = []
    for _ in range(80):
        # the same masks every step: the model can memorise this batch
        out = model(x, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.6 * losses[0], losses[::10]
    if target == "pixel":
        # predicting each normalised patch's mean scores about 1.0: the model must beat that
        assert losses[-1] < 0.9, losses[::10]
    assert out.pred.shape == (4, 65, 32 if target == "clip" else 48)


def test_explicit_ids_shuffle_reproduces_the_mask(teacher):
    model = micro("prompting", "clip", "semantic", teacher).eval()
    x = torch.randn(2, 3, IMG, IMG)
    first = model(x)
    again = model(x, ids_shuffle=first.ids_shuffle)
    assert torch.equal(first.mask, again.mask)
    torch.testing.assert_close(first.loss, again.loss)


@pytest.mark.parametrize("size", sorted(PRESETS))
def test_every_preset_builds_with_its_shape(size):
    """Each preset (on the meta device: no memory) has the encoder and decoder it names."""
    shape = PRESETS[size]
    img = 224 if shape.patch_size > 4 else 32
    with torch.device("meta"):
        student = build_student(size, img_size=img, decoder="prompting", pred_dim=16, mask_ratio=0.75)
    assert student.patch_embed.patch_size == (shape.patch_size,) * 2
    assert student.cls_token.shape[-1] == shape.embed_dim and len(student.blocks) == shape.depth
    assert student.blocks[0].attn.num_heads == shape.num_heads
    assert student.decoder_embed.out_features == shape.decoder_embed_dim
    assert len(student.decoder_blocks) == shape.decoder_depth


# --- bad input ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, words", [
    (dict(img_size=30), "not divisible by the patch size"),
    (dict(mask_ratio=1.0), "mask ratio"),
    (dict(mask_ratio=0.0), "mask ratio"),
    (dict(size="vit_gigantic"), "unknown model size"),
])
def test_bad_student_shapes_are_clear_errors(kwargs, words):
    args = dict(size=SIZE, img_size=IMG, decoder="prompting", pred_dim=48, mask_ratio=0.75) | kwargs
    size = args.pop("size")
    with pytest.raises(ConfigError, match=words):
        build_student(size, **args)


def test_unknown_teacher_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown teacher model 'ViT-B-61'.*ViT-B-16.*ViT-B-16-quickgelu"):
        build_teacher("ViT-B-61", None)


def test_missing_teacher_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_teacher("milan-clip-micro", str(tmp_path / "nope.pt"))


def test_teacher_student_grid_mismatch_is_caught_at_construction(teacher):
    with pytest.raises(ConfigError, match="patch grids differ.*8x8.*4x4"):
        build_pretrainer(size=SIZE, img_size=16, target="clip", decoder="prompting",
                         masking="random", mask_ratio=0.75, teacher=teacher)


def test_teacher_loads_from_a_local_checkpoint(tmp_path):
    import open_clip
    torch.manual_seed(3)
    clip = open_clip.create_model("milan-clip-micro")
    torch.save(clip.state_dict(), tmp_path / "teacher.pt")
    t = build_teacher("milan-clip-micro", str(tmp_path / "teacher.pt"))
    torch.testing.assert_close(t.visual.proj, clip.visual.proj)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(t(x).targets[:, 0], clip.eval().encode_image(x), atol=1e-5, rtol=1e-5)
    # a checkpoint of another architecture is a clear error, not a state-dict dump
    with pytest.raises(ConfigError, match="does not fit model"):
        build_teacher("milan-clip-tiny", str(tmp_path / "teacher.pt"))


def test_adamw_groups_are_the_authors():
    """timm's add_weight_decay(model, 0.05) with no skip list, as in the authors' main_pretrain.py:
    biases and 1-d parameters are exempt; cls_token and mask_token are decayed."""
    from harness.config import parse_config
    from harness.train.step import build_optimizer

    cfg = parse_config({"model": {"size": "vit_micro_patch4", "img_size": 32, "target": "pixel", "masking": "random"}})
    model = build_pretrainer(size="vit_micro_patch4", img_size=32, target="pixel", decoder="prompting",
                             masking="random", mask_ratio=0.75, teacher=None)
    optimizer = build_optimizer(model, cfg.pretrain.weight_decay, cfg.pretrain.betas)
    names = {id(p): n for n, p in model.student.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert {"cls_token", "mask_token"} <= decay[cfg.pretrain.weight_decay]
    assert all(n.endswith(".bias") or model.student.get_parameter(n).ndim <= 1 for n in decay[0.0])
    assert any(n.endswith("norm.weight") for n in decay[0.0])
    assert not {n for n, p in model.student.named_parameters() if p.requires_grad} - decay[0.0] - decay[cfg.pretrain.weight_decay]


def test_lr_schedule_is_the_authors_warmup_and_half_cycle_cosine():
    """The authors' adjust_learning_rate (MAE util/lr_sched.py) at fractional epochs, against the
    per-step schedule, over the paper's recipe (400 epochs, 40 of warm-up, lr 1.5e-4 * 4096 / 256)."""
    import math

    from harness.train.schedule import lr_at, scaled_lr

    def authors(epoch: float, lr: float, min_lr: float, warmup: float, epochs: float) -> float:
        if epoch < warmup:
            return lr * epoch / warmup
        return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / (epochs - warmup)))

    per_epoch, epochs, warmup = 312, 400, 40
    base = scaled_lr(1.5e-4, 4096)
    for min_lr in (0.0, 1e-6):
        for step in range(0, per_epoch * epochs, 11):
            ours = lr_at(step, base=base, total_steps=per_epoch * epochs, warmup_steps=warmup * per_epoch, min_lr=min_lr)
            assert ours == pytest.approx(authors(step / per_epoch, base, min_lr, warmup, epochs), rel=0, abs=1e-15 * base)
