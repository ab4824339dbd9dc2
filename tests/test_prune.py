"""orstack prune: masks, methods, recovery, sparse storage and the command's behaviour."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import cli_defaults, run_orstack, tree_hash

from orstack.errors import BadInput
from orstack.prune.core import PruneSpec, masks_of, model_sparsity, prune_matrix, prune_model
from orstack.prune.masks import check_nm, nm_mask, parse_pattern, row_mask
from orstack.prune.sparsegpt import sparsegpt_prune
from orstack.prune.storage import is_sparse_checkpoint, pack_bits, read_sparse_state, save_sparse, unpack_bits

torch.set_num_threads(1)


def run_ok(*args: str) -> None:
    """A quiet in-process run that must succeed (its stderr is shown when it does not)."""
    result = run_orstack("--quiet", *args)
    assert result.returncode == 0, result.stderr


def refused(result, *named: str) -> str:
    """A bad-input refusal: exit 2, one line on stderr naming every string in `named`, nothing on stdout."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for text in named:
        assert text in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


class Stats:
    """What layerwise.InputStats provides, computed from a plain input matrix."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    @property
    def norm(self) -> torch.Tensor:
        return self.x.norm(dim=0)

    def hessian(self) -> torch.Tensor:
        return self.x.t() @ self.x / self.x.shape[0]


@pytest.fixture(scope="module")
def structured_layer():
    """A random layer whose inputs have very uneven channel scales and low-rank structure,
    as LLM activations do (a few channels carry large values)."""
    g = torch.Generator().manual_seed(0)
    cols, rows, n = 128, 64, 1024
    scale = torch.exp(1.5 * torch.randn(cols, generator=g))
    x = (torch.randn(n, 16, generator=g) @ torch.randn(16, cols, generator=g)
         + 0.5 * torch.randn(n, cols, generator=g)) * scale
    w = torch.randn(rows, cols, generator=g)
    return w, x


def output_error(w, new, x) -> float:
    return float(((x @ w.t() - x @ new.t()) ** 2).sum() / (x @ w.t()).pow(2).sum())


# --- masks and patterns -------------------------------------------------------------------

def test_parse_pattern():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern("1:8") == (1, 8)
    for bad in ("3:2", "4:4", "0:4", "2-4", "a:b", "2:4:8"):
        with pytest.raises(BadInput):
            parse_pattern(bad)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (4, 8)])
def test_nm_mask_prunes_exactly_n_lowest_per_group(n, m):
    scores = torch.rand(32, 64, generator=torch.Generator().manual_seed(n * m))
    keep = nm_mask(scores, n, m)
    groups_keep = keep.reshape(32, -1, m)
    assert bool(((~groups_keep).sum(2) == n).all())
    # the pruned ones are the N smallest of each group
    groups = scores.reshape(32, -1, m)
    largest_pruned = groups.masked_fill(groups_keep, -1).max(2).values
    smallest_kept = groups.masked_fill(~groups_keep, 2).min(2).values
    assert bool((largest_pruned < smallest_kept).all())


def test_nm_mask_needs_width_multiple_of_m():
    with pytest.raises(BadInput, match="multiple of 4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_check_nm_rejects_a_violated_pattern():
    w = torch.randn(8, 16)
    w[:, ::2] = 0
    check_nm(w, 2, 4)
    w[3, 0] = 1.0
    with pytest.raises(RuntimeError, match="2:4 pattern is violated"):
        check_nm(w, 2, 4, "w")


def test_row_mask_gives_every_row_the_sparsity():
    scores = torch.rand(16, 100)
    keep = row_mask(scores, 0.37)
    assert bool(((~keep).sum(1) == 37).all())
    forced = torch.zeros_like(keep)
    forced[:, :50] = True
    keep = row_mask(scores, 0.2, forced)
    assert not bool(keep[:, :50].any())


# --- methods ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_wanda_and_sparsegpt_beat_magnitude_on_structured_activations(structured_layer, pattern):
    w, x = structured_layer
    stats = Stats(x)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        new = prune_matrix(w, PruneSpec(method=method, pattern=pattern), 0.5, stats)
        assert float((new == 0).float().mean()) == pytest.approx(0.5, abs=1e-6)
        if pattern:
            check_nm(new, *pattern)
        errors[method] = output_error(w, new, x)
    assert errors["wanda"] < 0.5 * errors["magnitude"]
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"]
    # the OBS update on top of the choice of weights: with light dampening SparseGPT beats Wanda
    light = prune_matrix(w, PruneSpec(method="sparsegpt", pattern=pattern, damp=1e-3), 0.5, stats)
    assert output_error(w, light, x) < errors["wanda"]


def test_sparsegpt_per_row_sparsity_and_forced_zeros(structured_layer):
    w, x = structured_layer
    forced = torch.zeros_like(w, dtype=torch.bool)
    forced[:, 5] = True
    new, keep = sparsegpt_prune(w, Stats(x).hessian(), sparsity=0.6, blocksize=32, forced=forced)
    assert bool(((new == 0).sum(1) == round(128 * 0.6)).all())
    assert bool((new[:, 5] == 0).all())
    assert torch.equal(keep, new != 0)


# --- whole model --------------------------------------------------------------------------------

@pytest.fixture()
def model_and_ids(random_llama):
    from orstack.io.checkpoint import load_model

    model, tok = load_model(random_llama)
    ids = torch.randint(3, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, tok, ids


def test_prune_model_leaves_embeddings_and_head_dense(model_and_ids):
    model, _, ids = model_and_ids
    embed = model.model.embed_tokens.weight.clone()
    head = model.lm_head.weight.clone()
    report = prune_model(model, ids, PruneSpec(method="wanda", sparsity=0.5, attn_sparsity=0.25))
    assert len(report.layers) == 14
    for name, s in report.layers.items():
        assert s == pytest.approx(0.25 if ".self_attn." in name else 0.5, abs=1e-6)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert torch.equal(model.lm_head.weight, head)


def test_lm_head_is_pruned_only_when_asked_and_untied(model_and_ids, tmp_path):
    from orstack.io.checkpoint import load_model

    model, _, ids = model_and_ids
    report = prune_model(model, ids, PruneSpec(method="sparsegpt", pattern=(2, 4), lm_head=True))
    assert report.layers["lm_head.weight"] == pytest.approx(0.5)
    check_nm(model.lm_head.weight.detach(), 2, 4)
    assert "lm_head.weight" in masks_of(model)
    save_sparse(model, tmp_path, set(masks_of(model)))
    model.config.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, with_tokenizer=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: refused
    with pytest.raises(BadInput, match="tied"):
        prune_model(model, ids, PruneSpec(method="wanda", lm_head=True))


def test_recovery_keeps_pruned_weights_exactly_zero(model_and_ids):
    from orstack.prune.recover import recover

    model, _, ids = model_and_ids
    prune_model(model, None, PruneSpec(method="magnitude", pattern=(2, 4)))
    before = {k: v.clone() for k, v in masks_of(model).items()}
    weights = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    result = recover(model, ids, steps=5, lr=1e-3, batch_size=4)
    assert result.steps == 5
    after = masks_of(model)
    for name, keep in before.items():
        assert not bool((after[name] & ~keep).any()), name  # nothing pruned came back
    now = model.model.layers[0].mlp.up_proj.weight.detach()
    assert not torch.equal(now, weights)  # the kept weights did train
    for module in model.model.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            check_nm(module.weight.detach(), 2, 4)


def test_gradual_stages_reach_target_and_keep_earlier_zeros(model_and_ids):
    from orstack.prune.pipeline import Schedule, prune_with_schedule

    model, _, ids = model_and_ids
    outcome = prune_with_schedule(model, ids, PruneSpec(method="sparsegpt", sparsity=0.6), Schedule(gradual=3),
                                  recover_ids=ids, evaluate=lambda m: 1.0)
    assert [round(r["target"], 2) for r in outcome.stages] == [0.2, 0.4, 0.6]
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):  # every row: round(0.6 * width) zeros, exactly
                assert bool(((module.weight == 0).sum(1) == round(0.6 * module.in_features)).all())


# --- sparse storage ------------------------------------------------------------------------------

def test_bit_packing_round_trips_odd_widths():
    keep = torch.rand(5, 13) > 0.5
    packed = pack_bits(keep)
    assert packed.shape == (5, 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bits(packed, 13), keep)
    # documented bit order: bit j of a row is bit j % 8 (LSB first) of byte j // 8
    first = torch.tensor([[True] + [False] * 8 + [True]])
    assert pack_bits(first).tolist() == [[1, 2]]


def test_sparse_storage_round_trips_exactly_and_is_smaller(model_and_ids, tmp_path):
    model, _, _ = model_and_ids
    prune_model(model, None, PruneSpec(method="magnitude", sparsity=0.5))
    sizes = save_sparse(model, tmp_path, set(masks_of(model)))
    assert is_sparse_checkpoint(tmp_path)
    state = read_sparse_state(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    linear_bytes = sum(v.numel() * 4 for v in masks_of(model).values())
    other_bytes = sizes["dense_bytes"] - linear_bytes
    # 50% of the linears: half the values plus a 1/32 bitmask, everything else dense
    assert sizes["stored_bytes"] < other_bytes + 0.55 * linear_bytes
    assert sizes["stored_bytes"] < 0.8 * sizes["dense_bytes"]


def test_sparse_storage_is_byte_identical_for_the_same_weights(model_and_ids, tmp_path):
    """safetensors orders its metadata by a per-map random hash: the writer sorts it, so the file
    (and the sha256 a child's manifest records for it) does not change between runs."""
    model, _, _ = model_and_ids
    prune_model(model, None, PruneSpec(method="magnitude", sparsity=0.5))
    files = set()
    for i in range(8):
        (tmp_path / str(i)).mkdir()
        save_sparse(model, tmp_path / str(i), set(masks_of(model)))
        files.add((tmp_path / str(i) / "orstack-sparse.safetensors").read_bytes())
    assert len(files) == 1
    assert torch.equal(read_sparse_state(tmp_path / "0")["model.layers.0.mlp.up_proj.weight"],
                       model.model.layers[0].mlp.up_proj.weight)


def test_sparse_storage_of_a_tied_model_loads_through_load_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from orstack.io.checkpoint import load_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    prune_model(model, None, PruneSpec(method="magnitude", pattern=(2, 4)))
    save_sparse(model, tmp_path, set(masks_of(model)))
    config.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, with_tokenizer=False)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- the command --------------------------------------------------------------------------------

def test_cli_prunes_compresses_and_every_stage_can_load(random_llama, sample_text_file, tmp_path):
    from orstack.io.checkpoint import load_model

    out, dense_out = tmp_path / "pruned", tmp_path / "dense"
    common = ["--calib", sample_text_file, "--method", "wanda", "--pattern", "2:4", "--nsamples", "4",
              "--seqlen", "32", "--eval-length", "64"]
    run_ok("prune", random_llama, *common, "-o", out)
    run_ok("prune", random_llama, *common, "--no-compress", "-o", dense_out)
    manifest = json.loads((out / "orstack.json").read_text())
    metrics = manifest["metrics"]
    assert manifest["weights_format"] == "orstack-sparse-bitmask"
    assert metrics["pattern"] == "2:4" and metrics["sparsity"] == pytest.approx(0.5)
    assert set(metrics["layer_sparsity"].values()) == {0.5}
    assert metrics["ppl_before"] > 0 and metrics["ppl_after"] > 0
    assert manifest["args"]["method"] == "wanda"
    # the pattern fixed the sparsity: the manifest records no --sparsity that was not applied
    assert manifest["args"]["pattern"] == "2:4" and manifest["args"]["sparsity"] is None
    sparse_size = (out / "orstack-sparse.safetensors").stat().st_size
    dense_size = (dense_out / "model.safetensors").stat().st_size
    assert sparse_size < 0.8 * dense_size
    sparse_model, _ = load_model(out)
    dense_model, _ = load_model(dense_out)
    for (name, a), (_, b) in zip(sparse_model.state_dict().items(), dense_model.state_dict().items()):
        assert torch.equal(a, b), name
    for layer in sparse_model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                check_nm(module.weight.detach(), 2, 4)
    # a pruned checkpoint is itself a valid input: pruning again keeps the old zeros
    again = tmp_path / "again"
    run_ok("prune", out, "--calib", sample_text_file, "--method", "magnitude", "--sparsity", "0.6",
           "--eval-length", "64", "-o", again)
    again_model, _ = load_model(again)
    assert model_sparsity(again_model).sparsity == pytest.approx(0.6, abs=3e-3)
    assert not bool((masks_of(again_model)["model.layers.0.mlp.up_proj.weight"]
                     & ~masks_of(sparse_model)["model.layers.0.mlp.up_proj.weight"]).any())


def test_cli_gradual_with_recovery_reports_each_stage(random_llama, sample_text_file, tmp_path):
    out = tmp_path / "gradual"
    run_ok("prune", random_llama, "--calib", sample_text_file, "--method", "wanda", "--nsamples", "4",
           "--seqlen", "32", "--sparsity", "0.6", "--gradual", "2", "--recover", sample_text_file,
           "--steps", "3", "--heldout", sample_text_file, "--eval-length", "64", "-o", out)
    metrics = json.loads((out / "orstack.json").read_text())["metrics"]
    stages = metrics["stages"]
    assert [s["stage"] for s in stages] == [1, 2] and all(s["ppl"] > 0 for s in stages)
    assert all("recover_loss_last" in s for s in stages)
    assert stages[0]["sparsity"] == pytest.approx(0.3, abs=3e-3)
    assert metrics["sparsity"] == pytest.approx(0.6, abs=3e-3) and metrics["ppl_on"] == "heldout"
    assert metrics["ppl_after"] == stages[-1]["ppl"]


def test_cli_grid_keeps_best_by_score(random_llama, sample_text_file, tmp_path):
    out = tmp_path / "grid"
    result = run_orstack("prune", random_llama, "--calib", sample_text_file, "--method", "magnitude",
                         "--grid", "0.2,0.7", "--size-weight", "100", "--eval-length", "64", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "grid: score = -ln(ppl) - 100.0 x size" in result.stderr  # the command prints the grid table
    manifest = json.loads((out / "orstack.json").read_text())
    rows = manifest["metrics"]["grid"]
    assert [r["sparsity"] for r in rows] == [0.2, 0.7]
    best = max(rows, key=lambda r: r["score"])
    assert best["best"] and best["sparsity"] == 0.7  # a heavy size weight favours the sparser model
    assert manifest["metrics"]["sparsity"] == pytest.approx(0.7, abs=3e-3)
    assert manifest["args"]["grid"] == [0.2, 0.7] and manifest["args"]["sparsity"] is None


# --- config = manifest ---------------------------------------------------------------------------

def test_manifest_args_rebuild_the_config(random_llama, sample_text_file, tmp_path):
    """Every option that changes the output reaches the manifest: the config the CLI built comes
    back from orstack.json whole, and a library run records exactly the config it was given."""
    from orstack.io.manifest import config_from_manifest, read_manifest
    from orstack.prune import PruneConfig, run
    from orstack.runtime import Runtime

    out = tmp_path / "cli"
    run_ok("--seed", "7", "prune", random_llama, "--calib", sample_text_file, "--method", "magnitude",
           "--sparsity", "0.4", "--mlp-sparsity", "0.6", "--nsamples", "2", "--seqlen", "16", "--no-compress",
           "--heldout", sample_text_file, "--eval-length", "32", "--dtype", "bfloat16", "-o", out)
    expected = PruneConfig(method="magnitude", sparsity=0.4, mlp_sparsity=0.6, nsamples=2, seqlen=16, compress=False,
                           heldout=[str(sample_text_file)], eval_length=32, dtype="bfloat16", seed=7,
                           calib=[str(sample_text_file)])
    manifest = read_manifest(out)
    assert manifest["config_class"] == "orstack.prune.stage:PruneConfig"
    assert config_from_manifest(manifest) == expected
    assert manifest["metrics"]["layer_sparsity"]["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.6, abs=3e-3)

    config = PruneConfig(method="wanda", pattern="2:4", nsamples=2, seqlen=16, eval_length=32, seed=3,
                         calib=[str(sample_text_file)], recover=str(sample_text_file), steps=1)
    result = run(random_llama, tmp_path / "lib", config, Runtime(device="cpu", seed=3))
    assert result.output == tmp_path / "lib" and result.metrics["pattern"] == "2:4"
    assert config_from_manifest(read_manifest(result.output)) == config


def test_cli_defaults_are_the_config_defaults():
    from orstack.prune import PruneConfig

    cli = cli_defaults("prune")
    not_options = {"seed"}  # the global --seed, copied from the Runtime
    required = {"calib"}  # --calib has no default
    fields = {f.name: f for f in dataclasses.fields(PruneConfig)}
    assert set(cli) - {"model", "output", "dry_run"} == set(fields) - not_options  # --dry-run plans, not runs
    assert all(cli[name] is None for name in required)
    for name in set(fields) - not_options - required:
        f = fields[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        assert cli[name] == default, name


# --- bad input: exit 2, one line naming the option or file, nothing written ------------------------

@pytest.mark.parametrize("extra, named", [
    (["--sparsity", "1.0"], ["--sparsity 1.0"]),
    (["--sparsity", "-0.1"], ["--sparsity -0.1"]),
    (["--pattern", "3:2"], ["--pattern 3:2", "0 < N < M"]),
    (["--method", "random"], ["--method random"]),
    (["--pattern", "2:4", "--gradual", "3"], ["--gradual", "--pattern"]),
    (["--pattern", "2:4", "--sparsity", "0.7"], ["--pattern 2:4", "--sparsity"]),
    (["--pattern", "2:4", "--attn-sparsity", "0.3"], ["--pattern 2:4", "--attn-sparsity"]),
    (["--pattern", "2:4", "--grid", "0.5"], ["--pattern 2:4", "--grid"]),
    (["--grid", "0.5,0.6", "--sparsity", "0.7"], ["--grid", "--sparsity"]),
    (["--grid", "0.5,1.2"], ["--grid 1.2"]),
    (["--steps", "5"], ["--steps", "--recover"]),
    (["--dtype", "int3"], ["--dtype int3"]),
])
def test_cli_bad_options_exit_2_and_write_nothing(random_llama, sample_text_file, tmp_path, extra, named):
    out = tmp_path / "out"
    refused(run_orstack("prune", random_llama, "--calib", sample_text_file, "-o", out, *extra), *named)
    assert not out.exists()


def test_cli_missing_calibration_file_and_model(random_llama, tmp_path):
    out = tmp_path / "out"
    refused(run_orstack("prune", random_llama, "--calib", tmp_path / "none.txt", "-o", out),
            "--calib", "none.txt: no such file")
    refused(run_orstack("prune", tmp_path / "nomodel", "--calib", tmp_path / "none.txt", "-o", out), "nomodel")
    assert not out.exists()


def test_cli_unsupported_architecture_exits_2(sample_text_file, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(gpt2)
    out = tmp_path / "out"
    refused(run_orstack("prune", gpt2, "--calib", sample_text_file, "-o", out), str(gpt2),
            "unsupported architecture 'gpt2'")
    assert not out.exists()


def test_cli_tied_lm_head_refused_before_loading(sample_text_file, tmp_path, monkeypatch):
    from conftest import build_random_llama

    import orstack.io.checkpoint

    tied = build_random_llama(tmp_path / "tied", tie=True)
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    refused(run_orstack("prune", tied, "--calib", sample_text_file, "--prune-lm-head", "-o", tmp_path / "out"),
            "--prune-lm-head", str(tied), "tied")
    assert not (tmp_path / "out").exists()


def test_cli_pattern_that_does_not_fit_a_width_refused_before_loading(sample_text_file, tmp_path, monkeypatch):
    from conftest import build_random_llama

    import orstack.io.checkpoint

    narrow = build_random_llama(tmp_path / "w200", hidden=200)  # 200 = 16 x 12 + 8
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    line = refused(run_orstack("prune", narrow, "--calib", sample_text_file, "--pattern", "2:16",
                               "-o", tmp_path / "out"), "--pattern 2:16", "self_attn.q_proj", "not a multiple of 16")
    assert "down_proj" not in line  # its input, the intermediate width 400, fits
    assert not (tmp_path / "out").exists()


def _no_loading(*args, **kwargs):
    raise AssertionError("weights were loaded before the inputs were checked")


def test_cli_device_cuda_without_cuda_exits_2_before_loading(random_llama, sample_text_file, tmp_path, monkeypatch):
    import orstack.io.checkpoint

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    refused(run_orstack("--device", "cuda", "prune", random_llama, "--calib", sample_text_file, "-o", tmp_path / "out"),
            "--device cuda", "no CUDA")
    assert not (tmp_path / "out").exists()


# --- the output policy: refused up front, nothing on disk changed --------------------------------

@pytest.mark.parametrize("case", ["existing file", "user directory", "missing parent", "the input"])
def test_cli_output_policy(random_llama, sample_text_file, tmp_path, monkeypatch, case):
    import shutil

    import orstack.io.checkpoint

    source, out = random_llama, tmp_path / "out"
    if case == "existing file":
        out.write_text("my notes\n")
        watched, named = out, "is a file"
    elif case == "user directory":
        out.mkdir()
        (out / "thesis.tex").write_text("mine\n")
        watched, named = out, "not written by orstack"
    elif case == "missing parent":
        out = tmp_path / "nodir" / "out"
        watched, named = out.parent, "does not exist"
    else:
        source = out = tmp_path / "model"
        shutil.copytree(random_llama, source)
        watched, named = source, "would overwrite the input"
    before = tree_hash(watched)
    monkeypatch.setattr(orstack.io.checkpoint, "load_model", _no_loading)
    refused(run_orstack("prune", source, "--calib", sample_text_file, "-o", out), "-o", str(out), named)
    assert tree_hash(watched) == before
