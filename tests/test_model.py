import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from aksis.config import IGNORE_INDEX, ModelConfig
from aksis.kv_cache import KVCache
from aksis.model import GPT, apply_rope, rope_tables


def test_changing_a_future_token_never_changes_earlier_logits(arch: str) -> None:
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 24))
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % 300
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_loss_is_mean_cross_entropy_and_skips_ignored_targets(arch: str) -> None:
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 10))
    targets = torch.randint(0, 300, (2, 10))
    targets[0, :4] = IGNORE_INDEX
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 10, 300)
    kept = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[kept], targets[kept])
    assert loss is not None and torch.allclose(loss, expected)
    assert model(idx)[1] is None


def test_input_longer_than_the_context_is_a_clear_error() -> None:
    model = GPT(tiny_config(block_size=16))
    with pytest.raises(ValueError, match="17 tokens is longer than the context \\(16 tokens\\); keep only the last 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_preset_has_the_124m_parameters_of_openai_gpt2() -> None:
    model = GPT(ModelConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808  # GPT2LMHeadModel's count, tied lm_head counted once
    assert model.num_params(exclude_embeddings=True) == 124_439_808 - 50257 * 768 - 1024 * 768


def test_tied_embeddings_share_one_tensor_and_untied_do_not() -> None:
    tied = GPT(tiny_config())
    assert tied.lm_head.weight is tied.transformer.wte.weight
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.num_params() - tied.num_params() == 300 * 64  # the separate output projection


def test_flavours_build_their_own_modules() -> None:
    gpt2, llama = GPT(tiny_config("gpt2")), GPT(tiny_config("llama"))
    assert gpt2.transformer.wpe is not None and llama.transformer.wpe is None
    assert isinstance(gpt2.transformer.ln_f, torch.nn.LayerNorm)
    assert type(llama.transformer.ln_f).__name__ == "RMSNorm"
    assert gpt2.transformer.h[0].attn.c_attn.bias is not None
    assert all(not name.endswith("bias") for name, _ in llama.named_parameters())
    # GQA: queries 4 heads, keys and values 2 heads each, head size 16.
    assert llama.transformer.h[0].attn.c_attn.weight.shape == ((4 + 2 * 2) * 16, 64)


def test_residual_projections_get_the_scaled_gpt2_init() -> None:
    cfg = ModelConfig(n_layer=8, n_embd=256, n_head=4, d_ff=1024, vocab_size=500, block_size=32)
    model = GPT(cfg)
    block = model.transformer.h[0]
    scaled = 0.02 / math.sqrt(2 * 8)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)


def test_grouped_query_attention_equals_multi_head_with_shared_kv_heads() -> None:
    """A GQA model equals an MHA model whose key/value heads are copies of the shared ones."""
    gqa = GPT(tiny_config("llama", n_kv_head=2)).eval()
    mha = GPT(tiny_config("llama", n_kv_head=4)).eval()
    state = gqa.state_dict()
    hd, nh = 16, 4
    for i in range(2):
        w = state[f"transformer.h.{i}.attn.c_attn.weight"]
        q, k, v = w.split([nh * hd, 2 * hd, 2 * hd])
        expand = lambda t: t.view(2, hd, -1).repeat_interleave(2, dim=0).reshape(nh * hd, -1)
        state[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], atol=1e-5, rtol=0)


def test_rope_scores_depend_only_on_relative_position() -> None:
    cfg = tiny_config("llama")
    cos, sin = rope_tables(cfg)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(q, cos[pq : pq + 1], sin[pq : pq + 1])
        rk = apply_rope(k, cos[pk : pk + 1], sin[pk : pk + 1])
        return (rq * rk).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-4)


def test_dropout_is_active_in_training_only() -> None:
    model = GPT(tiny_config(dropout=0.5))
    idx = torch.randint(0, 300, (1, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_flops_per_token_follows_the_palm_estimate() -> None:
    cfg = tiny_config()
    model = GPT(cfg)
    matmul_weights = model.num_params(exclude_embeddings=True) + cfg.vocab_size * cfg.n_embd  # + tied lm_head
    forward = 2 * matmul_weights + 4 * cfg.n_layer * cfg.block_size * cfg.n_embd
    assert model.flops_per_token() == 3 * forward
    assert model.flops_per_token(seq_len=8, training=False) == 2 * matmul_weights + 4 * cfg.n_layer * 8 * cfg.n_embd


def test_backward_reaches_every_parameter(arch: str) -> None:
    model = GPT(tiny_config(arch))
    idx = torch.randint(0, 300, (2, 8))
    _, loss = model(idx, idx.roll(-1, dims=1))
    assert loss is not None
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# n_kv_head None: as many key/value heads as query heads; 2 of 4: grouped-query attention.
@pytest.mark.parametrize(("arch", "n_kv_head"), [("gpt2", None), ("llama", None), ("llama", 2)])
def test_attention_weights_are_causal_probabilities_that_reproduce_sdpa(arch: str, n_kv_head: int | None) -> None:
    """Weights @ V equals the attention output that SDPA computes in forward, layer by layer."""
    model = GPT(tiny_config(arch, n_kv_head=n_kv_head)).eval()
    idx = torch.randint(0, 300, (2, 12))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (attention input, attention output)
    hooks = [
        block.attn.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out)))
        for i, block in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    cfg = model.config
    for layer, block in enumerate(model.transformer.h):
        weights = model.attention_weights(idx, layer)
        assert weights.shape == (2, cfg.n_head, 12, 12)
        assert torch.all(weights.triu(diagonal=1) == 0)  # no token attends to a later one
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, cfg.n_head, 12))
        x, out = seen[layer]
        kv_dim = cfg.n_kv_head * cfg.head_dim
        v = block.attn.c_attn(x)[..., -kv_dim:].view(2, 12, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v = v.repeat_interleave(cfg.n_head // cfg.n_kv_head, dim=1)  # (B, nh, T, hd)
        y = (weights @ v).transpose(1, 2).reshape(2, 12, cfg.n_embd)
        torch.testing.assert_close(block.attn.c_proj(y), out, atol=1e-5, rtol=1e-4)


def test_attention_weights_name_a_layer_that_does_not_exist() -> None:
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="layer must be between 0 and 1, got 2"):
        model.attention_weights(torch.zeros(1, 4, dtype=torch.long), 2)


# ----- the decode path -----


def test_last_only_logits_equal_the_last_row_of_the_full_forward(arch: str) -> None:
    model = GPT(tiny_config(arch)).eval()
    idx = torch.randint(0, 300, (2, 12))
    with torch.inference_mode():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
        cache = KVCache(model.config, batch_size=2, max_len=16)
        cached, _ = model(idx, kv_cache=cache, input_pos=torch.arange(12), last_only=True)
        nxt = torch.randint(0, 300, (2, 1))
        step, _ = model(nxt, kv_cache=cache, input_pos=torch.tensor([12]), last_only=True)
        full_next, _ = model(torch.cat([idx, nxt], dim=1))
    assert last.shape == cached.shape == step.shape == (2, 1, 300)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, full[:, -1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full_next[:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="last_only .* cannot compute a loss"):
        model(idx, idx, last_only=True)
