"""MultiExitViT: logits at every depth, compute-only-what-is-needed paths, early exit, truncation."""

from __future__ import annotations

import pytest
import torch

from skindistil.errors import ModelError
from skindistil.models import MultiExitViT, create_teacher

DEPTH = 4


def _vit(**overrides):
    torch.manual_seed(0)
    settings = dict(num_classes=5, embed_dim=32, depth=DEPTH, num_heads=2, img_size=32, patch_size=8)
    return create_teacher(**{**settings, **overrides}).eval()


@pytest.fixture
def x():
    torch.manual_seed(1)
    return torch.randn(6, 3, 32, 32)


@pytest.mark.parametrize("shared_head", [False, True])
def test_every_path_agrees_with_the_others(x, shared_head):
    vit = _vit()
    model = MultiExitViT(vit, shared_head=shared_head).eval()
    with torch.no_grad():
        everything = model.forward_all(x)
        assert everything.shape == (DEPTH, 6, 5)
        assert torch.allclose(model(x), vit(x), atol=1e-6)  # the last exit is the model itself
        assert torch.allclose(everything[-1], model(x), atol=1e-6)
        for depth in range(1, DEPTH + 1):
            assert torch.allclose(model.forward_until(x, depth), everything[depth - 1], atol=1e-6)
            truncated = model.truncate(depth).eval()
            assert len(truncated.blocks) == depth
            assert torch.allclose(truncated(x), everything[depth - 1], atol=1e-6)


def test_own_heads_add_parameters_and_a_shared_head_adds_none():
    vit = _vit()
    base = sum(p.numel() for p in vit.parameters())
    per_exit = sum(p.numel() for p in vit.norm.parameters()) + sum(p.numel() for p in vit.head.parameters())
    assert sum(p.numel() for p in MultiExitViT(_vit()).parameters()) == base + (DEPTH - 1) * per_exit
    assert sum(p.numel() for p in MultiExitViT(_vit(), shared_head=True).parameters()) == base


def test_exit_heads_are_trained_independently(x):
    model = MultiExitViT(_vit()).train()
    torch.nn.functional.cross_entropy(model.forward_all(x)[0], torch.zeros(6, dtype=torch.long)).backward()
    assert _grad_size(model.exit_heads[0].weight) > 0 and _grad_size(model.vit.blocks[0].mlp.fc1.weight) > 0
    # the loss at depth 1 reaches neither the other heads nor the later blocks
    assert _grad_size(model.exit_heads[1].weight) == 0 and _grad_size(model.vit.head.weight) == 0
    assert _grad_size(model.vit.blocks[1].mlp.fc1.weight) == 0


def _grad_size(param):
    return 0.0 if param.grad is None else float(param.grad.abs().sum())


def test_selected_exits(x):
    model = MultiExitViT(_vit(), exits=[2, 4]).eval()
    assert model.num_exits == 2
    with torch.no_grad():
        assert model.forward_all(x).shape == (2, 6, 5)
    with pytest.raises(ModelError, match="depth 3 has no exit"):
        model.forward_until(x, 3)
    for exits in ([2, 3], [3, 2, 4], [0, 4], "some"):
        with pytest.raises(ModelError, match="exits="):
            MultiExitViT(_vit(), exits=exits)


def test_early_exit_stops_each_sample_at_its_first_confident_exit(x):
    model = MultiExitViT(_vit()).eval()
    with torch.no_grad():
        everything = model.forward_all(x)
        confidence = everything.softmax(-1).amax(-1)  # [depth, batch]

        logits, depth_used = model.early_exit(x, threshold=0.0)
        assert depth_used.tolist() == [1] * 6 and torch.allclose(logits, everything[0], atol=1e-6)

        logits, depth_used = model.early_exit(x, threshold=1.01)
        assert depth_used.tolist() == [DEPTH] * 6 and torch.allclose(logits, everything[-1], atol=1e-6)

        # a threshold between the samples' first-exit confidences splits the batch
        threshold = float(confidence[0].median())
        logits, depth_used = model.early_exit(x, threshold=threshold)
    for i in range(6):
        passed = [d for d in range(DEPTH) if confidence[d, i] >= threshold]
        expected = passed[0] + 1 if passed else DEPTH
        assert depth_used[i] == expected
        assert torch.allclose(logits[i], everything[expected - 1, i], atol=1e-5)
    assert len(set(depth_used.tolist())) > 1


def test_only_class_token_vits_can_have_exits():
    with pytest.raises(ModelError, match="global_pool='token'"):
        MultiExitViT(_vit(global_pool="avg"))


@pytest.mark.parametrize("kind", ["plain", "registers", "no_embed_class", "distilled"])
def test_timm_intermediates_give_exactly_the_block_loops_tokens(x, kind):
    """forward_all / forward_until read the blocks through timm's forward_intermediates: bit for bit
    the tokens of running the stem and the blocks by hand, with register and distillation tokens."""
    from skindistil.models.distilled import add_distillation_token
    from skindistil.models.multi_exit import vit_logits_and_hidden, vit_stem

    overrides = {"registers": {"reg_tokens": 2}, "no_embed_class": {"no_embed_class": True, "reg_tokens": 1}}
    vit = _vit(**overrides.get(kind, {}))
    if kind == "distilled":
        vit = add_distillation_token(vit).eval()
    model = MultiExitViT(vit).eval()
    with torch.no_grad():
        tokens, by_hand = vit_stem(vit, x), []
        for index, block in enumerate(vit.blocks):
            tokens = block(tokens)
            by_hand.append(model.exit_logits(index, tokens))
        everything, hidden = model.forward_all(x, return_hidden=True)
        assert torch.equal(everything, torch.stack(by_hand)) and torch.equal(hidden, tokens)
        for depth in range(1, DEPTH + 1):
            assert torch.equal(model.forward_until(x, depth), by_hand[depth - 1])
        logits, last = vit_logits_and_hidden(vit, x)
        assert torch.equal(last, tokens) and torch.equal(logits, vit(x))
