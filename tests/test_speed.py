"""Speed settings, checked on the CPU through what decides them: fused AdamW on CUDA (and its state
through regroups), TF32 only for fp32 runs on CUDA, overlap_comm only with several ranks, the
vocabulary padded inside the model only, compiled blocks through regroups, the fast DeepSpeed config."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from helpers import VOCAB, lm_loss, tiny_model
from megatie.tools.train_cli import build_parser, config_from_args, run_main, train_main
from megatie.config import TrainConfig
from megatie.engines.ds_config import engine_config, load_ds_config
from megatie.errors import CheckpointError, ConfigError
from megatie.engines.optim import FUSED_ADAMW, adam_step_tensor, build_adamw, fused_applies, param_groups, regroup_optimizer
from megatie.config import adopt_unset, check_settings
from megatie.engines.speed import compiled_graphs, set_tf32
from megatie.tying.layers import LayerTying, count_parameters
from megatie.models.vocab import build_lm, padded_vocab_size
from zero_helper import base_args, record_losses, write_reference_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = os.path.join(ROOT, "ds_configs", "zero2_bf16_fast.json")


def _rel(a, b) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _run(args, sync=None, ds_config=None):
    from megatie.trainer import Trainer

    cfg = config_from_args(build_parser().parse_args(args))
    cfg = cfg.replace(deepspeed_config=ds_config)
    trainer = Trainer(cfg, sync=sync)
    losses = record_losses(trainer)
    summary = trainer.train()
    return trainer, losses, summary


# --------------------------------------------------------------------------- fused AdamW
def test_adamw_is_the_exact_loop_on_cpu_and_fused_on_cuda():
    model = tiny_model("gpt2", n_layer=2)
    exact = build_adamw(param_groups(model, 0.1), lr=1e-3)
    assert all(not g["fused"] and g["foreach"] is False for g in exact.param_groups)
    cuda, cpu = SimpleNamespace(device=torch.device("cuda", 0)), SimpleNamespace(device=torch.device("cpu"))
    assert fused_applies([cuda, cuda]) is FUSED_ADAMW
    assert not fused_applies([cuda, cpu]) and not fused_applies([])
    assert all(g["fused"] for g in build_adamw(param_groups(model, 0.1), lr=1e-3, fused=True).param_groups)


def test_hand_installed_step_is_placed_as_torch_places_it():
    """A fused (or capturable) AdamW reads its step on the parameter's device as float32; the
    regroup and the checkpoint loader install steps by hand and must do the same. The meta device
    stands for CUDA: a host step would show."""
    params = [torch.nn.Parameter(torch.randn(5))]
    for fused in (True, False):
        opt = build_adamw([{"params": params, "weight_decay": 0.0}], lr=1e-3, fused=fused)
        params[0].grad = torch.randn(5)
        opt.step()
        own = opt.state[params[0]]["step"]
        made = adam_step_tensor(1, params[0], opt)
        assert (made.dtype, made.device, made.shape, float(made)) == (own.dtype, own.device, own.shape, float(own))
        on_meta = adam_step_tensor(3, torch.zeros(4, device="meta"), opt)
        assert on_meta.dtype == torch.float32 and on_meta.shape == ()
        assert on_meta.device.type == ("meta" if fused else "cpu")


def test_regroup_and_resume_install_the_step_where_the_masters_are(tmp_path):
    """The DeepSpeed regroup (``zero_state``) and the checkpoint loader (``zero_checkpoint``) give a
    fused optimizer's masters their step on the masters' device: meta here, standing for CUDA."""
    from megatie.engines.zero_checkpoint import load_zero_slice, save_zero_slice
    from megatie.engines.zero_state import _new_state, flat_views

    master = torch.nn.Parameter(torch.zeros(6, device="meta"))
    fused = torch.optim.AdamW([master], lr=1e-3, fused=True)
    key = id(master)
    _new_state(fused, flat_views(fused, 0), {key: 3}, {key: 5})
    assert fused.state[master]["step"].device.type == "meta" and fused.state[master]["step"].dtype == torch.float32
    host = torch.nn.Parameter(torch.randn(6))
    plain = build_adamw([{"params": [host], "weight_decay": 0.0}], lr=1e-3)
    host.grad = torch.randn(6)
    plain.step()
    save_zero_slice(plain, 0, str(tmp_path / "slice.safetensors"))
    fused.state.clear()
    load_zero_slice(fused, 0, str(tmp_path / "slice.safetensors"))
    assert fused.state[master]["step"].device.type == "meta" and fused.state[master]["step"].dtype == torch.float32


def test_fused_adamw_through_regroups_follows_the_exact_loop():
    """The plain-torch regroup with fused state (CPU's fused kernel): untied blocks take a copy of
    their source's state, step tensor included, and training goes on as with the exact loop."""
    def run(fused):
        model = tiny_model("gpt2", n_layer=4)
        tying = LayerTying(model)
        tying.initialize([0, 1, 1, 3], frozen=[3])
        opt = build_adamw(param_groups(model, 0.1), lr=1e-2, fused=fused)
        gen, losses = torch.Generator().manual_seed(0), []
        for step in range(12):
            loss = lm_loss(model, torch.randint(0, VOCAB, (2, 8), generator=gen))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if step in (3, 7):
                regroup_optimizer(opt, model, tying.apply([[0, 1, 2, 3], [0, 0, 2, 2]][step // 4]))
        return losses, opt

    fused_losses, opt = run(True)
    assert all(st["step"].dtype == torch.float32 and st["step"].device == p.device and float(st["step"]) > 0
               for p, st in opt.state.items())
    assert _rel(fused_losses, run(False)[0]) <= 1e-5


@pytest.fixture(scope="module")
def ds_sync():
    pytest.importorskip("deepspeed")
    from megatie.runtime.distributed import init_deepspeed_distributed

    return init_deepspeed_distributed()


def test_deepspeed_regroups_a_fused_adamw(tmp_path, ds_sync, monkeypatch):
    """What the DeepSpeed engine does with CUDA masters, on the CPU's fused kernel: ZeRO-2 through
    regroups against the torch engine, both fused. The single rank also turns overlap_comm off."""
    import megatie.engines.optim

    monkeypatch.setattr(megatie.engines.optim, "fused_applies", lambda params: True)
    reference = write_reference_run(str(tmp_path / "ref"))
    _, expected, _ = _run(base_args(str(tmp_path / "torch"), reference, steps=40))
    config = {"zero_optimization": {"stage": 2, "overlap_comm": True}}
    trainer, losses, _ = _run(base_args(str(tmp_path / "ds"), reference, steps=40), ds_sync, config)
    assert trainer.engine.regroups >= 3 and trainer.engine.optimizer.overlap_comm is False
    inner = trainer.engine.basic_optimizer
    assert all(g["fused"] for g in inner.param_groups)
    assert all(st["step"].dtype == torch.float32 and st["step"].device == master.device
               for master, st in inner.state.items())
    assert _rel(losses, expected) <= 1e-6


def test_offloaded_optimizer_state_keeps_the_host_loop(tmp_path, ds_sync, monkeypatch):
    """With offload_optimizer the masters DeepSpeed steps live on the host, whatever device the model
    is on: never the fused kernel there, and the summary says so."""
    import megatie.engines.optim

    monkeypatch.setattr(megatie.engines.optim, "fused_applies", lambda params: True)  # as if the model were on CUDA
    monkeypatch.setattr("megatie.engines.speed.fused_applies", lambda params: True)
    reference = write_reference_run(str(tmp_path / "ref"))
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    trainer, _, summary = _run(base_args(str(tmp_path / "ds"), reference, steps=2), ds_sync, config)
    assert not any(g["fused"] for g in trainer.engine.basic_optimizer.param_groups)
    assert summary["fused_adamw"] is False


# --------------------------------------------------------------------------- TF32
def test_tf32_only_for_fp32_runs_on_cuda():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        assert set_tf32(True, torch.device("cpu"), "fp32") is False and not matmul.allow_tf32
        assert set_tf32(True, torch.device("cuda", 0), "bf16") is False and not matmul.allow_tf32
        assert set_tf32(True, torch.device("cuda", 0), "fp32") is True and matmul.allow_tf32 and cudnn.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"  # the legacy reader still works
        assert set_tf32(False, torch.device("cuda", 0), "fp32") is False
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_speed_flags_are_settings():
    parse = lambda *a: config_from_args(build_parser().parse_args(list(a)))  # noqa: E731
    default = parse().resolved()
    assert (default.engine.tf32, default.engine.compile, default.model.pad_vocab_to) == (True, False, 128)
    flagged = parse("--no-tf32", "--compile", "--pad-vocab-to", "64").resolved()
    assert (flagged.engine.tf32, flagged.engine.compile, flagged.model.pad_vocab_to) == (False, True, 64)
    with pytest.raises(ConfigError, match="pad-vocab-to"):
        parse("--pad-vocab-to", "0").resolved()


# --------------------------------------------------------------------------- overlap_comm
def test_overlap_comm_only_with_several_ranks():
    user = load_ds_config(FAST)
    cfg = SimpleNamespace(optim=SimpleNamespace(batch_size=2, grad_accum=1, grad_clip=1.0))
    assert user["zero_optimization"]["overlap_comm"] is True
    assert engine_config(user, cfg, 1)["zero_optimization"]["overlap_comm"] is False
    assert engine_config(user, cfg, 8)["zero_optimization"]["overlap_comm"] is True
    assert user["zero_optimization"]["overlap_comm"] is True  # the run's recorded config is untouched
    assert "zero_optimization" not in engine_config({}, cfg, 1)


def test_fast_config_is_engine_settings_for_bf16_zero2():
    user = load_ds_config(FAST)  # refuses batch, lr, optimizer or clipping settings
    zero = user["zero_optimization"]
    assert user["bf16"]["enabled"] and zero["stage"] == 2
    assert zero["contiguous_gradients"] and zero["reduce_scatter"]
    assert zero["reduce_bucket_size"] >= 2e8 and zero["allgather_bucket_size"] >= 2e8


# --------------------------------------------------------------------------- padded vocabulary
def _padded_and_plain(vocab=100, pad_to=64):
    from megatie.models import get_spec

    spec = get_spec("gpt2")
    shape = {"n_layer": 2, "n_embd": 16, "n_head": 2, "seq_len": 32, "vocab_size": vocab, "dropout": 0.0}
    padded = build_lm(spec, shape, seed=0, pad_to=pad_to)
    plain = spec.build(2, 16, 2, 32, vocab, 0.0, seed=0)
    rows = ("transformer.wte.weight", "lm_head.weight")
    plain.load_state_dict({k: v[:vocab] if k in rows else v for k, v in padded.state_dict().items()})
    return padded, plain


def test_padded_model_computes_the_unpadded_loss():
    assert padded_vocab_size(50257, 128) == 50304 and padded_vocab_size(512, 128) == 512
    padded, plain = _padded_and_plain()
    assert padded.get_input_embeddings().num_embeddings == 128 and padded.config.vocab_size == 128
    assert padded.config.eos_token_id == plain.config.eos_token_id == 99
    assert padded.generation_config.eos_token_id == 99
    ids = torch.randint(0, 100, (3, 32), generator=torch.Generator().manual_seed(1))
    out, ref = padded(input_ids=ids, labels=ids), plain(input_ids=ids, labels=ids)
    assert torch.isinf(out.logits[..., 100:]).all() and (out.logits[..., 100:] < 0).all()
    assert torch.allclose(out.logits[..., :100], ref.logits, atol=1e-6)
    assert float(out.loss) == pytest.approx(float(ref.loss), rel=1e-6)
    out.loss.backward()
    grad = padded.get_input_embeddings().weight.grad
    assert grad[:100].abs().sum() > 0 and torch.count_nonzero(grad[100:]) == 0  # the padding learns nothing


def test_generation_never_emits_a_padded_id():
    padded, _ = _padded_and_plain()
    padded.eval()
    with torch.no_grad():  # padded rows that would win every step if they were not masked
        rows = torch.randn(28, 16, generator=torch.Generator().manual_seed(2))
        padded.get_input_embeddings().weight[100:] = 50 * rows
    prompt = torch.randint(0, 100, (4, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(prompt)

    def sample(**options):
        torch.manual_seed(0)
        return padded.generate(prompt, attention_mask=mask, max_new_tokens=24, pad_token_id=99, **options)[:, 4:]

    for options in ({"do_sample": False}, {"do_sample": True, "top_k": 0, "temperature": 2.0}):
        assert int(sample(**options).max()) < 100, options
    padded._megatie_vocab_mask.remove()  # the check is sensitive: unmasked, padded ids come out
    assert int(sample(do_sample=False).max()) >= 100


def test_checkpoints_from_before_padding_resume_unpadded():
    cfg = adopt_unset(TrainConfig(), {"n_layer": 4})
    assert cfg.model.pad_vocab_to == 1
    assert check_settings({"vocab_size": 512}, {"vocab_size": 512, "pad_vocab_to": 1}, []) == {}
    with pytest.raises(CheckpointError, match="pad_vocab_to"):
        check_settings({"vocab_size": 512}, {"vocab_size": 512, "pad_vocab_to": 128}, [])


ARGS = ["--n-layer", "4", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--batch-size", "4",
        "--vocab-size", "512", "--pad-vocab-to", "384", "--max-steps", "6", "--checkpoint-every", "6",
        "--eval-every", "6", "--eval-batches", "2", "--seed", "3", "--no-progress"]


def test_a_padded_run_exports_the_tokenizers_vocabulary(tmp_path, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatie.tools.command import command_main
    from megatie.tools.export import load_compact, load_run
    from megatie.models import get_spec

    run = tmp_path / "run"
    assert run_main(train_main, ARGS + ["--out-dir", str(run), "--cache-dir", cache_dir]) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert summary["padded_vocab_size"] == 768 and config["pad_vocab_to"] == 384 and config["vocab_size"] == 512
    assert summary["tf32"] is False and config["tf32"] is True  # asked for, but this is no CUDA fp32 run
    # Parameter counts are the optimizer's tensors: padding rows included.
    unpadded = count_parameters(get_spec("gpt2").build(4, 32, 2, 32, 512, 0.0, seed=0))[1]
    assert summary["conventional_trainable_params"] == unpadded + 256 * 32

    model = load_run(str(run))[0]
    assert model.get_input_embeddings().num_embeddings == model.config.vocab_size == 512
    assert model.lm_head.weight is model.get_input_embeddings().weight
    for fmt in ("hf", "compact"):
        assert run_main(command_main, ["export", str(run), str(tmp_path / fmt), "--format", fmt]) == 0
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf.config.vocab_size == len(tokenizer) == 512
    assert load_compact(str(tmp_path / "compact")).config.vocab_size == 512
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


# --------------------------------------------------------------------------- compiled blocks
def _compiler_works() -> str | None:
    try:
        torch.compile(lambda x: torch.sin(x) * 2 + 1)(torch.ones(8))
    except Exception as e:  # no C++ compiler, or an inductor that cannot build here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


@pytest.mark.slow  # the first compilation: about a minute on a 2-core CPU
def test_compiled_blocks_train_through_regroups(tmp_path, cache_dir):
    """qlearning's schedule (frozen blocks at first, then decisions that tie and untie) with every
    block compiled: losses as uncompiled, and the graphs compiled bounded and none added by the
    later regroups."""
    problem = _compiler_works()
    if problem:
        pytest.skip(f"torch.compile cannot build kernels on this machine ({problem})")
    base = dict(cache_dir=cache_dir, n_layer=4, n_embd=32, n_head=2, seq_len=32, batch_size=4, vocab_size=512,
                max_steps=24, tie_every=4, eval_every=8, eval_batches=2, log_every=1, progress=False, seed=7,
                tie_policy="qlearning", save_checkpoints=False)
    from megatie.trainer import Trainer

    results = {}
    for compiled in (False, True):
        start = compiled_graphs()  # a process-wide count: only this run's graphs are counted
        trainer = Trainer(TrainConfig.from_flat(out_dir=str(tmp_path / str(compiled)), compile=compiled, **base))
        losses, graphs = record_losses(trainer), []
        regroup = trainer.engine.regroup
        trainer.engine.regroup = lambda plan: (graphs.append(compiled_graphs() - start), regroup(plan))[1]
        summary = trainer.train()
        results[compiled] = (losses, graphs, summary, compiled_graphs() - start)
    (plain, _, _, none), (losses, graphs, summary, final) = results[False], results[True]
    assert none == 0 and summary["compiled_blocks"] == 4 and summary["regroups"] >= 3
    assert _rel(losses, plain) <= 1e-4
    # One graph per grad mode and kind of block tensors (megatie/engines/speed.py): training, training with frozen
    # blocks, no-grad evaluation - whatever the number of blocks or of regroups.
    assert 0 < final <= 3, (graphs, final)
    assert graphs[1:] == [final] * (len(graphs) - 1), (graphs, final)
