import subprocess
import sys

import pytest

from stoa_vlp import cli


@pytest.mark.parametrize("name", cli.COMMANDS)
def test_every_command_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: stoa-vlp {name}")
    assert "stoa-vlp " + name in text.split("options:")[-1], "the epilog shows an example of the command"


def test_help_does_not_import_torch():
    # the command modules import heavy libraries where they run: `stoa-vlp X --help` answers at once
    # instead of after about 1.5 s of importing torch (fresh interpreter: the tests imported it here)
    script = ("import sys\nfrom stoa_vlp import cli\nfor name in cli.COMMANDS:\n    try:\n"
              "        cli.main([name, '--help'])\n    except SystemExit:\n        pass\n"
              "print(sorted(name for name in ('torch', 'numpy', 'av') if name in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["detect", "v.mp4", "--weights", "w.pth", "--out", "d.jsonl", "--frame-rate", "0"],
         "argument --frame-rate: must be > 0 and finite, got 0"),
        (["detect", "v.mp4", "--weights", "w.pth", "--out", "d.jsonl", "--score-threshold", "1.5"],
         "argument --score-threshold: must be between 0 and 1, got 1.5"),
        (["prepare", "videos", "out", "--fps", "-2"], "argument --fps: must be > 0 and finite, got -2"),
        (["prepare", "videos", "out", "--fps", "nan"], "argument --fps: must be > 0 and finite, got nan"),
        (["prepare", "videos", "out", "--crf", "60"], "argument --crf: must be between 0 and 51"),
        (["prepare", "videos", "out", "--workers", "two"], "argument --workers: expected an integer, got 'two'"),
        (["synth", "world", "--miss-rate", "-0.1"], "argument --miss-rate: must be between 0 and 1, got -0.1"),
        (["synth", "world", "--val", "-1"], "argument --val: must be >= 0, got -1"),
        (["demo", "--train-clips", "0"], "argument --train-clips: must be > 0, got 0"),
        (["search", "index", "a dog", "--top", "0"], "argument --top: must be > 0, got 0"),
        (["caption", "--checkpoint", "run", "a.mp4", "--beam", "0"], "argument --beam: must be > 0, got 0"),
        (["vinvl", "p.tsv", "--fps", "1", "--out", "d.jsonl", "--start-number", "-1"],
         "argument --start-number: must be >= 0, got -1"),
    ],
)
def test_numeric_options_out_of_range_are_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_numeric_options_in_range_parse_to_numbers():
    from stoa_vlp.commands.arguments import fraction, non_negative_int, positive_float

    assert positive_float("2.5") == 2.5
    assert non_negative_int("0") == 0
    assert fraction("1") == 1.0


def test_the_executable_reports_bad_input_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert cli.console_main(["prepare", str(missing), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [f"stoa-vlp prepare: error: {missing}: annotation file does not exist "
                     "(stoa-vlp -v prepare ... shows the traceback)"]
    with pytest.raises(ValueError, match="annotation file does not exist"):  # -v: the whole traceback
        cli.console_main(["-v", "prepare", str(missing), str(tmp_path / "out")])
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  frams: 8\n")
    assert cli.console_main(["pretrain", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"stoa-vlp pretrain: error: {config}: unknown config key 'model.frams'")
