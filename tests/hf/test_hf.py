"""fastattn.hf on tiny transformers models built from config (no downloads): Llama (grouped-query
heads), GPT-2 and BERT with linear, local and performer (``register``) and hedgehog (``linearize``)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fastattn.hf as fh  # noqa: E402
from fastattn.hf.attention import adapter  # noqa: E402

V = 61
METHODS = {"linear": {}, "local": {"window": 3, "block": 4}, "performer": {"num_features": 16, "chunk": 8}}


def _name(method: str, **kw) -> str:
    return fh.register(f"test-{method}" + "".join(f"-{k}{v}" for k, v in kw.items()), method,
                       **{**METHODS[method], **kw})


def llama(attn: str = "sdpa", **kw):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attn).eval()


def gpt2(attn: str = "sdpa", **kw):
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128, **kw)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn).eval()


def bert(attn: str = "sdpa", **kw):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=128, **kw)
    torch.manual_seed(0)
    return transformers.BertModel._from_config(cfg, attn_implementation=attn).eval()


BUILD = {"llama": llama, "gpt2": gpt2, "bert": bert}


def _out(model, **kw):
    out = model(**kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _padded_equals_alone(model, decoder: bool) -> None:
    """Row 0 (9 tokens) padded to 12 in a batch with a full row equals row 0 run alone (< 1e-4)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, V, (2, 12), generator=g)
    real = ids[0, :9].clone()
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        if decoder:  # left padding, positions counted from the first real token (as generate does)
            ids[0, :3] = 0
            ids[0, 3:] = real
            mask[0, :3] = 0
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            batched = _out(model, input_ids=ids, attention_mask=mask, position_ids=pos)[0, 3:]
        else:  # right padding
            ids[0, 9:] = 0
            mask[0, 9:] = 0
            batched = _out(model, input_ids=ids, attention_mask=mask)[0, :9]
        alone = _out(model, input_ids=real[None])[0]
    assert (batched - alone).abs().max() < 1e-4


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", list(BUILD))
def test_padded_rows_equal_the_unpadded_sequence(arch: str, method: str) -> None:
    model = BUILD[arch](_name(method))
    _padded_equals_alone(model, decoder=arch != "bert")


def test_padding_is_honoured_not_ignored() -> None:
    """The same check fails for padding keys that are attended (the trap of a missing mask function)."""
    model = llama(_name("linear"))
    ids = torch.randint(1, V, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).logits[0, 3:]
        attended = model(input_ids=ids).logits[0, 3:]
    assert (masked - attended).abs().max() > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_decoders_stay_causal(arch: str, method: str) -> None:
    model = BUILD[arch](_name(method))
    ids = torch.randint(1, V, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % V
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits
    assert (a[0, :6] - b[0, :6]).abs().max() < 1e-5
    assert (a[0, 6:] - b[0, 6:]).abs().max() > 1e-4


def _generate_cached_equals_uncached(model, row: int = 0, pad: int = 3):
    """Greedy ``generate()`` of 6 tokens after a 7-token prompt (row ``row`` left-padded by ``pad``) is
    the same with the cache as without; returns the prompt and its mask."""
    ids = torch.randint(1, V, (2, 7))
    mask = torch.ones_like(ids)
    mask[row, :pad] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    return ids, mask


@pytest.mark.parametrize("method", list(METHODS))
def test_generate_with_cache_equals_without(method: str) -> None:
    _generate_cached_equals_uncached(llama(_name(method)), row=1, pad=2)


def test_one_mechanism_per_layer_fixed_across_calls() -> None:
    name = _name("performer")
    model = llama(name)
    with torch.no_grad():
        a = model(input_ids=torch.randint(1, V, (1, 5))).logits
    mechs = adapter(name).mechanisms
    layers = [m for m in model.modules() if type(m).__name__ == "LlamaAttention"]
    first = [mechs[m] for m in layers]
    assert not torch.equal(first[0].projection, first[1].projection)  # seeded per layer
    with torch.no_grad():
        model(input_ids=torch.randint(1, V, (1, 5)))
    assert all(mechs[m] is f for m, f in zip(layers, first))  # the same features at prefill and decode
    assert torch.isfinite(a).all()


def test_packed_sequences_attend_within_their_document() -> None:
    model = llama(_name("linear"))
    ids = torch.randint(1, V, (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos).logits[0]
        first = model(input_ids=ids[:, :4]).logits[0]
        second = model(input_ids=ids[:, 4:]).logits[0]
    assert (packed - torch.cat([first, second])).abs().max() < 1e-4


@pytest.mark.parametrize("arch,field", [("gpt2", "attn_pdrop"), ("bert", "attention_probs_dropout_prob"),
                                        ("llama", "attention_dropout")])
def test_dropout_policy(arch: str, field: str) -> None:
    kw = {"attention_dropout": 0.1} if arch == "llama" else {}  # GPT-2 and BERT default to 0.1
    model = BUILD[arch](_name("linear"), **kw).train()
    ids = torch.randint(1, V, (2, 6))
    with pytest.raises(ValueError, match=field):
        model(input_ids=ids)
    model.eval()
    model(input_ids=ids)  # eval mode: no dropout, no error
    ignore = BUILD[arch](fh.register("test-linear-nodrop", "linear", dropout="ignore"), **kw).train()
    _out(ignore, input_ids=ids).sum().backward()  # trains, attention dropout left out as asked
    grads = [p.grad for n, p in ignore.named_parameters() if "layers.0" in n or ".h.0." in n or "layer.0." in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_refusals_name_the_setting() -> None:
    with pytest.raises(ValueError, match="linearize"):
        fh.register("test-hh", "hedgehog")
    with pytest.raises(ValueError, match="unknown option"):
        fh.register("test-bad", "linear", window=3)
    with pytest.raises(ValueError, match="dropout must be"):
        fh.register("test-bad", "linear", dropout="sometimes")
    fn = adapter(_name("linear"))
    module = llama().model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="config.sliding_window"):
        fn(module, q, k, k, None, sliding_window=4)
    with pytest.raises(ValueError, match="softcapping"):
        fn(module, q, k, k, None, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        fn(module, q, k, k, None, s_aux=torch.zeros(4))
    out, _ = adapter(_name("local", window=4))(module, q, k, k, None, sliding_window=4)  # local maps it
    assert out.shape == (1, 5, 4, 8)
    with pytest.raises(ValueError, match="2-D"):
        fn(module, q, k, k, torch.ones(1, 1, 5, 5, dtype=torch.bool))


def _perturb(model) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "fastattn_core" in n:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_linearize_hedgehog_decodes_from_a_constant_state(arch: str) -> None:
    from fastattn.ops.linear.state import LinearState

    model = fh.linearize(BUILD[arch](), "hedgehog", chunk=4)
    _perturb(model)
    ids, mask = _generate_cached_equals_uncached(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    layers = out.past_key_values.layers
    assert [type(layer).__name__ for layer in layers] == ["FastattnStateLayer"] * 2
    assert isinstance(layers[0].state, LinearState) and layers[0].state.kv.shape == (2, 4, 16, 8)
    assert out.past_key_values.get_seq_length() == 7
    _padded_equals_alone(model, decoder=True)
    names = [n for n, _ in model.named_parameters() if "fastattn_core" in n]
    assert len(names) == 8 and all(p.requires_grad for n, p in model.named_parameters() if n in names)


def test_linearize_hedgehog_with_a_softmax_window() -> None:
    """LoLCATs' hybrid (window=4 < the 13 generated positions): options pass through linearize, decoding
    keeps the window's ring and the older keys' linear state, generate() with the cache equals without."""
    from fastattn.ops.linear.window import WindowLinearState

    model = fh.linearize(llama(), "hedgehog", window=4, chunk=4)
    _perturb(model)
    assert model.config.fastattn["options"]["window"] == 4
    ids, mask = _generate_cached_equals_uncached(model)
    with torch.no_grad():
        state = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values.layers[0].state
    assert isinstance(state, WindowLinearState) and state.k.shape[2] == 4 and state.kv.shape == (2, 4, 16, 8)
    _padded_equals_alone(model, decoder=True)
    enc = fh.linearize(bert(), "hedgehog", window=2)
    _perturb(enc)
    _padded_equals_alone(enc, decoder=False)
    batches = [{"input_ids": torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(i)),
                "use_cache": False} for i in range(2)]
    g0 = model.model.layers[0].self_attn.fastattn_core.window_factor.detach().clone()
    report = fh.distill(model, batches, steps=10, lr=3e-2, progress=False)  # LoLCATs' output MSE
    assert report.transfer_losses[-1] < report.transfer_losses[0]
    assert not torch.equal(g0, model.model.layers[0].self_attn.fastattn_core.window_factor)


def test_linearize_hybrid_and_encoder() -> None:
    model = fh.linearize(llama(), "hedgehog", layers=[1])
    _perturb(model)
    assert model.model.layers[0].self_attn.__dict__.get("_modules", {}).get("fastattn_core") is None
    ids = torch.randint(1, V, (1, 6))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
        kinds = [type(x).__name__ for x in model(input_ids=ids, use_cache=True).past_key_values.layers]
    assert kinds == ["DynamicLayer", "FastattnStateLayer"]
    enc = fh.linearize(bert(), "hedgehog")
    _perturb(enc)
    _padded_equals_alone(enc, decoder=False)


def test_save_pretrained_and_load(tmp_path) -> None:
    model = fh.linearize(llama(), "hedgehog")
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = fh.from_pretrained(transformers.LlamaForCausalLM, tmp_path).eval()
    assert loaded.config.fastattn["method"] == "hedgehog"
    ids = torch.randint(1, V, (1, 6))
    with torch.no_grad():
        assert (loaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < 1e-6
    plain = llama()  # the same base weights, untrained feature maps: differs
    fh.linearize(plain, "hedgehog")
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-4


def peaked_hedgehog_llama():
    """A tiny Llama with peaked attention (so that identity feature maps are far from softmax), linearized
    to hedgehog, and two batches for distill."""
    model = llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    fh.linearize(model, "hedgehog")
    batches = [{"input_ids": torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(i)),
                "use_cache": False} for i in range(2)]
    return model, batches


def test_distill_reduces_the_transfer_loss_then_finetunes() -> None:
    model, batches = peaked_hedgehog_llama()
    report = fh.distill(model, batches, steps=20, lr=3e-2, finetune_steps=2, progress=False)
    assert len(report.transfer_losses) == 20 and len(report.finetune_losses) == 2
    assert report.transfer_losses[-1] < 0.7 * report.transfer_losses[0]
    assert "attention transfer" in report.summary()
    with pytest.raises(ValueError, match="linearize"):
        fh.distill(llama(), batches, steps=1, progress=False)


def test_distill_on_recorded_attention_inputs() -> None:
    model, batches = peaked_hedgehog_llama()
    report = fh.distill(model, batches, steps=20, lr=3e-2, capture=2, progress=False)
    assert report.transfer_losses[-1] < 0.7 * report.transfer_losses[0]
    assert not any(getattr(m, "fastattn_transfer", False) for m in model.modules())


def test_convert_reports_the_share_of_pairs_inside_the_softmax_window() -> None:
    from fastattn.hf.convert import _window_share

    assert _window_share(128, 0) == 0.0
    assert _window_share(64, 64) == 1.0 and _window_share(10, 100) == 1.0
    # length 4, window 2: rows see 1, 2, 2, 2 keys inside the window out of 1 + 2 + 3 + 4
    assert _window_share(4, 2) == pytest.approx(7 / 10)
    assert _window_share(512, 64) < _window_share(128, 64)
