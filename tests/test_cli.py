"""prism.cli.parse_cli: omegaconf key=value overrides into a typed dataclass."""

from __future__ import annotations

import dataclasses

import pytest

from prism.cli import cli_keys, parse_cli


@dataclasses.dataclass
class Inner:
    layers: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    name: str = "x"


@dataclasses.dataclass
class Args:
    length: int = 4096
    threshold: float | None = dataclasses.field(default=None, metadata={"help": "top-p mass"})
    scorers: list[str] = dataclasses.field(default_factory=lambda: ["meanpool", "prism"])
    dense: bool = True
    backend: str = "flex"
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_defaults_without_arguments():
    assert parse_cli(Args, []) == Args()


def test_dotlist_overrides_are_typed():
    a = parse_cli(
        Args, ["length=8192", "threshold=0.9", "scorers=[prism,xattn]", "inner.layers=[3]"]
    )
    assert isinstance(a, Args) and isinstance(a.inner, Inner)
    assert a.length == 8192 and isinstance(a.length, int)
    assert a.threshold == 0.9 and a.scorers == ["prism", "xattn"] and a.inner.layers == [3]
    assert a.inner.name == "x" and a.dense is True  # untouched keys keep their defaults
    # a later override wins
    assert parse_cli(Args, ["length=1", "length=2"]).length == 2


def test_flag_aliases_match_dotlist():
    flags = parse_cli(
        Args, ["--length", "8192", "--threshold=0.5", "--scorers", "prism", "xattn", "--no-dense"]
    )
    dots = parse_cli(Args, ["length=8192", "threshold=0.5", "scorers=[prism,xattn]", "dense=false"])
    assert flags == dots
    assert parse_cli(Args, ["--dense"]).dense is True
    assert parse_cli(Args, ["--size", "8"], aliases={"size": "length"}).length == 8
    assert parse_cli(Args, ["reference"], positional="backend").backend == "reference"


def test_config_file_is_merged_first(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("length: 100\nthreshold: 0.7\ninner:\n  name: y\n")
    # the command-line override comes after the file, whatever the order on the line
    a = parse_cli(Args, ["length=5", "--config", str(f)])
    assert (a.length, a.threshold, a.inner.name) == (5, 0.7, "y")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["lenght=3"], "unknown key 'lenght'"),
        (["--lenght", "3"], "unknown option --lenght"),
        (["length=abc"], "length=abc"),
        (["dense=maybe"], "dense=maybe"),
        (["stray"], "unexpected argument"),
    ],
)
def test_errors_exit_2_and_list_valid_keys(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Args, argv, prog="t")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "valid keys: length, threshold, scorers, dense, backend, inner.layers, inner.name" in err


def test_config_file_with_unknown_key_fails(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("nope: 1\n")
    with pytest.raises(SystemExit) as exc:
        parse_cli(Args, ["--config", str(f)], prog="t")
    assert exc.value.code == 2 and "nope" in capsys.readouterr().err


def test_help_lists_every_field_type_and_default(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(Args, ["-h"], description="demo command", prog="t")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo command" in out
    for key, (_tp, default, _help) in cli_keys(Args).items():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(key + " "))
        assert repr(default) in line
    assert "int = 4096" in out and "top-p mass" in out and "list[str]" in out


def test_not_a_dataclass():
    with pytest.raises(TypeError):
        parse_cli(dict, [])


def test_demo_and_eval_flags_are_aliases_of_keys():
    from prism.__main__ import DemoArgs, SyntheticArgs
    from prism.eval.__main__ import EvalArgs

    old = ["--length", "8192", "--block-size", "64", "--no-dense", "--config", "hf/smollm2"]
    new = ["length=8192", "block_size=64", "dense=false", "config=hf/smollm2"]
    assert parse_cli(DemoArgs, old) == parse_cli(DemoArgs, new)
    assert parse_cli(DemoArgs, new).config == "hf/smollm2"  # the demo's own key, not a CLI file
    syn = parse_cli(SyntheticArgs, ["--synthetic", "--scorers", "prism", "xattn", "length=512"])
    assert (syn.scorers, syn.length) == (["prism", "xattn"], 512)
    args, rest = parse_cli(
        EvalArgs,
        ["ruler", "--dry-run", "length=[4096]", "model.name=tiny"],
        positional="config",
        passthrough=True,
    )
    assert (args.config, args.dry_run, args.report) == ("ruler", True, False)
    assert rest == ["length=[4096]", "model.name=tiny"]  # handed on to the experiment


def test_demo_rejects_an_unknown_scorer(capsys):
    from prism.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["scorer=nope", "length=512"])
    assert exc.value.code == 2 and "unknown scorer" in capsys.readouterr().err
