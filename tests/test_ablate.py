"""End to end: a tiny ablation trains, evaluates, skips finished cells, and reproduces itself.

The fixture runs it as a researcher adding to it would: one method from the command line
first, then the other, so the tables must hold cells of both runs.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from research import cli
from research.config import ConfigError, load_config, load_config_file
from research.eval.ablate import command_grid, grid_runs, run_ablation
from research.eval.evaluate import evaluate_run, load_run
from research.eval.pepler_compat import rating_errors
from research.eval.samples import samples_markdown, write_samples
from research.eval.tables import results_markdown
from tests.test_cli_errors import one_line_error

CONFIG = Path(__file__).parent / "configs" / "tiny_ablation.py"
CELLS = ("none", "id_prompt")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ablation")
    for method in CELLS:
        argv = ["ablate", "--config", str(CONFIG), "--workdir", str(workdir)]
        assert cli.main([*argv, "--axis", f"model.conditioning={method}", "--seeds", "0,1"]) == 0
    return workdir


def test_every_run_lands_with_metrics_and_tables(ablation: Path):
    for cell in CELLS:
        for seed in (0, 1):
            rundir = ablation / cell / f"seed{seed}"
            metrics = json.loads((rundir / "eval" / "test" / "metrics.json").read_text())
            assert {"bleu1", "bleu4", "rouge_l_f_score", "usr", "perplexity"} <= set(metrics)
            assert metrics["num_examples"] == 6
            run = json.loads((rundir / "run.json").read_text())
            assert run["config"]["model"]["conditioning"] == cell
            assert run["config"]["seed"] == seed
            assert "ablate" in run["command"] and run["git_commit"]
            samples = (rundir / "eval" / "test" / "samples.jsonl").read_text().splitlines()
            assert len(samples) == 6
            assert {"user", "item", "reference", "generated", "sampling"} <= set(
                json.loads(samples[0])
            )
            rated = [json.loads(line) for line in samples]
            assert all(1.0 <= row["predicted_rating"] <= 5.0 for row in rated)  # clamped
            recomputed = rating_errors(
                [r["rating"] for r in rated], [r["predicted_rating"] for r in rated], 1.0, 5.0
            )
            for key in ("rmse", "mae"):
                assert metrics[key] == pytest.approx(recomputed[key], abs=1e-9), key
    with (ablation / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["cell"], r["seed"]) for r in rows) == sorted(
        (c, str(s)) for c in CELLS for s in (0, 1)
    )
    table = [line for line in (ablation / "results.md").read_text().splitlines() if "|" in line]
    # Both partial runs' cells: the last run's first, then the other one.
    assert [line.split("|")[1].strip() for line in table[2:]] == list(CELLS)[::-1]
    assert all(line.split("|")[2].strip() == "2" for line in table[2:])


def test_every_method_and_seed_is_scored_on_the_same_seeded_sample(ablation: Path):
    evaluated, validated = set(), set()
    for cell in CELLS:
        for seed in (0, 1):
            rundir = ablation / cell / f"seed{seed}"
            samples = (rundir / "eval" / "test" / "samples.jsonl").read_text().splitlines()
            evaluated.add(tuple(json.loads(line)["example"] for line in samples))
            validated.add((rundir / "validation_subset.json").read_text())
    assert len(evaluated) == 1 and len(validated) == 1
    (examples,) = evaluated
    assert examples != tuple(range(6))  # not the first six in file order
    assert json.loads(validated.pop())["num_examples"] == 8  # max_eval_batches x eval_batch_size


def test_rerun_skips_finished_cells(ablation: Path, capsys):
    before = (ablation / "none" / "seed0" / "metrics.jsonl").read_text()
    run_ablation(CONFIG, ablation)
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 4
    assert (ablation / "none" / "seed0" / "metrics.jsonl").read_text() == before


def test_same_config_and_seed_give_identical_metrics_and_reach_tensorboard(ablation: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rundir = ablation / "id_prompt" / "seed0"
    first = (rundir / "eval" / "test" / "metrics.json").read_text()
    evaluate_run(rundir, "test", [("train.tensorboard", "true")])
    assert (rundir / "eval" / "test" / "metrics.json").read_text() == first
    metrics = json.loads(first)
    events = EventAccumulator(str(rundir / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    (bleu1,) = events.Scalars("eval/test/bleu1")
    assert bleu1.step == metrics["checkpoint_step"]
    assert bleu1.value == pytest.approx(metrics["bleu1"], rel=1e-6)
    (text,) = events.Tensors("eval/test/samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    first_sample = json.loads(
        (rundir / "eval" / "test" / "samples.jsonl").read_text().split("\n")[0]
    )
    assert first_sample["generated"].replace("|", "/") in table


def test_dry_run_lists_the_plan_and_runs_nothing(ablation: Path, capsys):
    before = sorted(p.relative_to(ablation) for p in ablation.rglob("*"))
    run_ablation(CONFIG, ablation, seeds="0,2", dry_run=True)
    out = capsys.readouterr().out
    assert "4 runs, 2 to run" in out
    assert "none seed 0: done" in out and "id_prompt seed 2: to run" in out
    assert sorted(p.relative_to(ablation) for p in ablation.rglob("*")) == before


def test_grid_from_the_command_line():
    grid = command_grid(CONFIG, "3,4", ["model.conditioning=none,prefix", "train.steps=2,3"])
    assert grid == {
        "axes": {"model.conditioning": ["none", "prefix"], "train.steps": ["2", "3"]},
        "seeds": [3, 4],
    }
    cleaning = command_grid(CONFIG, "0", ["data.clean_encoder_text=false,true"])
    runs = grid_runs(load_config_file(CONFIG), cleaning)
    assert [(cell, cfg.data.clean_encoder_text) for cell, _, cfg in runs] == [
        ("none__false", False),
        ("none__true", True),
        ("id_prompt__false", False),
        ("id_prompt__true", True),
    ]
    with pytest.raises(ConfigError, match="--axis"):
        command_grid(CONFIG, None, ["model.conditioning"])
    with pytest.raises(ConfigError, match="--seeds"):
        command_grid(CONFIG, "a,b")


def test_each_cell_has_the_config_research_train_builds(tmp_path):
    """Tokenizers follow init.* folders (an axis or an override) in every cell exactly as
    load_config makes them follow for `research train` with the same overrides."""
    folders = [str(tmp_path / "gpt2_a"), str(tmp_path / "gpt2_b")]
    axes = ["model.conditioning=prefix", f"init.decoder={','.join(folders)}"]
    grid = command_grid(CONFIG, "0,1", axes)
    overrides = [("init.encoder", str(tmp_path / "bert"))]
    runs = grid_runs(load_config_file(CONFIG), grid, overrides)
    cells = [(folder, seed) for folder in folders for seed in (0, 1)]
    assert len(runs) == len(cells)
    for (_, seed, cfg), (folder, expected_seed) in zip(runs, cells, strict=True):
        cell = [("model.conditioning", "prefix"), ("init.decoder", folder)]
        command = [*overrides, *cell, ("seed", str(seed))]
        assert seed == expected_seed
        assert cfg.to_dict() == load_config(CONFIG, command).to_dict()
        assert cfg.data.decoder_tokenizer == folder
        assert cfg.data.encoder_tokenizer == str(tmp_path / "bert")


def test_ablate_help_shows_grid_options_and_overrides(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ablate", "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in ("--seeds", "--axis", "--dry-run", "--config.KEY=VALUE"))


def test_results_markdown_marks_best_by_direction_and_formats_per_metric():
    rows = [
        {"cell": "a", "seed": 0, "bleu1": 1.0, "usr": 0.001, "perplexity": 5.0, "rmse": 1.2},
        {"cell": "a", "seed": 1, "bleu1": 3.0, "usr": 0.017, "perplexity": 7.0, "rmse": 1.0},
        {"cell": "b", "seed": 0, "bleu1": 4.0, "usr": 0.0125, "perplexity": 9.0, "rmse": 0.9},
    ]
    lines = results_markdown(rows).splitlines()
    assert lines[0] == "| cell | n | bleu1 | usr | perplexity | rmse |"
    # a: two seeds (mean ± sample std); b: one seed, so no "± 0.00".
    assert lines[2] == "| a | 2 | 2.00 ± 1.41 | 0.009 ± 0.011 | **6.00 ± 1.41** | 1.100 ± 0.141 |"
    assert lines[3] == "| b | 1 | **4.00** | **0.013** | 9.00 | **0.900** |"
    assert "lower is better for perplexity, rmse" in lines[5]
    assert "fmr, fcr, div (the data has no feature words)" in lines[6]
    assert "mae (no run predicts ratings)" in lines[6]


def test_notebook_executes_on_the_ablation(ablation: Path, monkeypatch):
    import nbclient
    import nbformat

    notebook = Path(__file__).parents[1] / "notebooks" / "explore_results.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "strip outputs"
    monkeypatch.setenv("RESULTS_DIR", str(ablation))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3").execute(
        cwd=str(notebook.parent)
    )
    figures = {p.name for p in (ablation / "figures").glob("*.png")}
    assert figures == {"loss_curves.png", "bleu4_by_method.png", "bleu_vs_perplexity.png"}
    printed = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "8 runs" not in printed and "4 runs under" in printed
    assert "id_prompt" in printed and "reference:" in printed


def test_samples_page_shows_each_method_of_seed0_for_the_same_drawn_examples(
    ablation: Path, tmp_path, capsys
):
    def generated(cell: str, seed: int) -> dict[int, dict]:
        path = ablation / cell / f"seed{seed}" / "eval" / "test" / "samples.jsonl"
        return {row["example"]: row for row in map(json.loads, path.read_text().splitlines())}

    # Earlier tests in this module rerun the grid, which rewrites results.csv in their order.
    with (ablation / "results.csv").open() as f:
        csv_order = list(dict.fromkeys(row["cell"] for row in csv.DictReader(f)))
    assert sorted(csv_order) == sorted(CELLS)
    out = tmp_path / "samples.md"
    argv = ["samples", "--workdir", str(ablation), "--n", "4", "--out", str(out)]
    assert cli.main(argv) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    sections = page.split("\n## Example ")[1:]
    assert len(sections) == 4
    examples = [int(section.split(":")[0]) for section in sections]
    assert examples == sorted(set(examples)) and set(examples) <= set(generated("none", 0))
    for example, section in zip(examples, sections, strict=True):
        row = generated("none", 0)[example]
        assert f"user `{row['user']}`, item `{row['item']}`" in section.splitlines()[0]
        table = [line[2:-2].split(" | ", 1) for line in section.splitlines()[4:]]
        texts = {name: text.replace("\\|", "|") for name, text in table}
        assert list(texts) == ["reference", *csv_order]  # results.csv's order, as results.md
        expected = {c: generated(c, 0)[example]["generated"] for c in CELLS}
        for name, text in {"reference": row["reference"], **expected}.items():
            assert texts[name] == (" ".join(text.split()) or "(empty)"), name
    # Seeded: the same page again; another draw seed, the same layout over other examples.
    assert cli.main([*argv, "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == page
    assert samples_markdown(ablation, n=10).count("\n## Example ") == 6  # all there are
    assert one_line_error(capsys, ["samples", "--workdir", str(tmp_path)], 2, "samples.jsonl")


def test_samples_page_lists_the_cells_in_the_order_of_results_csv(tmp_path):
    for cell in ("a", "b", "c"):
        path = tmp_path / cell / "seed0" / "eval" / "test" / "samples.jsonl"
        path.parent.mkdir(parents=True)
        rows = [{"example": i, "user": "u", "item": "i", "reference": "r", "generated": cell}
                for i in range(3)]  # fmt: skip
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "results.csv").write_text("cell,seed\nc,0\nc,1\na,0\n")
    page = write_samples(tmp_path, n=1).read_text()
    assert [line.split(" | ")[0] for line in page.splitlines()[-4:]] == [
        "| reference",
        "| c",
        "| a",
        "| b",
    ]


def test_generate_from_user_and_item_and_the_unknown_id_error(ablation: Path, capsys):
    from research.eval.single import encoder_input_for

    rundir = ablation / "id_prompt" / "seed0"
    run = load_run(rundir)
    test = run.dataset.splits["test"]
    record = test.records[0]
    # Built from the training histories exactly as the data pipeline built the test example.
    assert encoder_input_for(run, record.user, record.item) == test.encoder[0].tolist()

    argv = ["generate", "--workdir", str(rundir), "--item", record.item]
    assert cli.main([*argv, "--user", record.user]) == 0
    out, err = capsys.readouterr()
    assert "data.encoder_input='user_item_history'" in err and "[CLS] user: <" in err
    # The review (empty if EOS came first), then the MF head's rating of the known pair.
    assert out.count("\n") == 2 and out.splitlines()[1].startswith("predicted rating: ")
    assert cli.main([*argv, "--user", "nobody"]) == 2
    err = capsys.readouterr().err
    assert "--user 'nobody' is not a user of the run's training data" in err
    assert "reads user ids" in err


def test_generate_text_warns_for_unseen_ids_when_the_method_reads_no_ids(ablation: Path, capsys):
    rundir = ablation / "none" / "seed0"
    argv = ["generate", "--workdir", str(rundir), "--text", "great strings", "--user", "nobody"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert "warning: --user 'nobody' has no training reviews" in err
    assert "trained input (data.encoder_input=" in err and out.count("\n") == 1


def test_generate_for_one_text_prints_the_mf_rating_of_the_prompt_tables(ablation: Path, capsys):
    """MF under id_prompt rates a known (user, item): mean + <user row, item row> of the tables."""
    rundir = ablation / "id_prompt" / "seed0"
    first = json.loads((rundir / "eval" / "test" / "samples.jsonl").read_text().splitlines()[0])
    argv = ["generate", "--workdir", str(rundir), "--text", "the sound is good"]
    assert cli.main([*argv, "--user", first["user"], "--item", first["item"]]) == 0
    printed = capsys.readouterr().out.splitlines()
    rating = float(
        next(line for line in printed if line.startswith("predicted rating:")).split()[-1]
    )
    run = load_run(rundir)
    tables = run.params["conditioning_id_prompt"]
    user = np.asarray(tables["user"]["embedding"])[run.dataset.user_index[first["user"]]]
    item = np.asarray(tables["item"]["embedding"])[run.dataset.item_index[first["item"]]]
    expected = np.clip(run.dataset.rating_mean + user @ item, *run.dataset.rating_range)
    assert rating == pytest.approx(expected, abs=0.006)  # printed with two decimals
    assert rating == pytest.approx(first["predicted_rating"], abs=0.006)  # same pair as scored


def test_shuffled_conditioning_changes_what_reads_it_and_nothing_else(ablation: Path):
    """experiments/shuffled_conditioning.py: each example gets another's ids and encoder input
    (and keeps its target); ``none`` reads neither for text, so its perplexity is unchanged,
    while its MF head and the id_prompt decoder read the ids and score differently."""
    path = Path(__file__).parents[1] / "experiments" / "shuffled_conditioning.py"
    spec = importlib.util.spec_from_file_location("shuffled_conditioning", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    run = load_run(ablation / "id_prompt" / "seed0")
    donors = script.derangement(len(run.dataset.splits["test"]), 0)
    assert not np.any(donors == np.arange(len(donors)))
    shuffled = dataclasses.replace(run, conditioning_of={"test": donors})

    def by_example(batches) -> dict[int, dict]:
        """Each real row of ``batches`` as its own dict, masks applied to the encoder ids."""
        rows = {}
        for b in batches:
            for i in np.flatnonzero(b["example"] >= 0):
                ids = b["encoder_ids"][i][b["encoder_mask"][i] == 1]
                rows[int(b["example"][i])] = {**{k: b[k][i] for k in b}, "encoder_ids": ids}
        return rows

    own, got = by_example(run.batches("test", 4)), by_example(shuffled.batches("test", 4))
    assert sorted(got) == sorted(own)
    for example, row in got.items():
        donor = own[int(donors[example])]
        for key in ("decoder_ids", "rating"):
            np.testing.assert_array_equal(row[key], own[example][key])
        for key in ("user", "item", "encoder_ids"):
            np.testing.assert_array_equal(row[key], donor[key])

    none = script.shuffled_conditioning(str(ablation / "none" / "seed0"), 1)
    assert none["shuffled"][0]["perplexity"] == none["as_is"]["perplexity"]
    assert none["shuffled"][0]["rmse"] != pytest.approx(none["as_is"]["rmse"], abs=1e-6)
    metrics = json.loads(
        (ablation / "none" / "seed0" / "eval" / "test" / "metrics.json").read_text()
    )
    assert none["as_is"]["perplexity"] == pytest.approx(metrics["perplexity"], rel=1e-9)
    assert none["as_is"]["rmse"] == pytest.approx(metrics["rmse"], abs=1e-9)
    id_prompt = script.shuffled_conditioning(str(ablation / "id_prompt" / "seed0"), 1)
    assert id_prompt["shuffled"][0]["perplexity"] != pytest.approx(
        id_prompt["as_is"]["perplexity"], rel=1e-6
    )
