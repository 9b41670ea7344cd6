"""Flags: the original repository's command lines parse, every flag is documented, speed flags
resolve per device, bad combinations and values are one line, and the resume command is
built from the parsed config."""
import os
import re
import shlex

import pytest

from conftest import one_line, REPO, run_main, step_args
from parameter import resume_command
from run import configure


def test_original_readme_commands_parse_and_every_flag_is_documented():
    cfg = configure("--batch_size 64 --imsize 64 --dataset celeb --adv_loss hinge --version sagan_celeb "
                         "--total_step 100000 --span 3".split())
    assert (cfg.g_span, cfg.d_span, cfg.version, cfg.dataset) == (3, 3, "sagan_celeb", "celeb")
    cfg = configure("--batch_size 64 --imsize 64 --dataset lsun --adv_loss hinge --version sagan_lsun".split())
    assert cfg.dataset == "lsun" and cfg.span == 0
    assert configure(["--span", "2", "--d_span", "0"]).version == "sagan_emoji_g2_d0"
    from parameter import build_parser
    readme = (REPO / "README.md").read_text()
    flags = sorted(set(re.findall(r"(--[a-z0-9_]+)", build_parser().format_help())) - {"--help"})
    assert [f for f in flags if f"`{f}`" not in readme] == []



def test_every_choice_help_offers_is_accepted_on_either_device():
    from parameter import build_parser, parse_flags, resolve_device_defaults
    context = {"--launcher": ["--span", "0,1"]}  # slurm runs a sweep's cells: it needs a list to sweep
    offered = [(a.option_strings[0], str(c)) for a in build_parser()._actions if a.option_strings and a.choices
               for c in a.choices]
    assert ("--compile", "default") in offered and len(offered) > 20
    for flag, choice in offered:
        for device in ("cpu", "cuda"):
            resolve_device_defaults(parse_flags([flag, choice, *context.get(flag, [])]), device)

# ---------------------------------------------------------------------------- resume hint
@pytest.mark.parametrize("start", [["--resume", "false"], ["--pretrained_model=2"], ["--resume", "true"]],
                         ids=["resume_false", "pretrained_model_eq", "resume_true"])
@pytest.mark.slow
def test_the_resume_hint_is_built_from_the_config(tmp_path, start):
    from run import unlock_run
    first = start == ["--resume", "false"]  # a new run; the others continue one
    if first:
        cfg = configure(step_args(tmp_path, "--version", "h", "--total_step", "6", "--g_lr", "3e-4", *start))
        unlock_run()
    assert run_main(step_args(tmp_path, "--version", "h", "--total_step", "2"), cwd=tmp_path).returncode == 0
    if not first:
        cfg = configure(step_args(tmp_path, "--version", "h", "--total_step", "6", "--g_lr", "3e-4", *start))
        unlock_run()
    for world, launcher in ((1, ["python"]), (2, ["torchrun", "--nproc_per_node", "2"])):
        words = shlex.split(resume_command(cfg, world))
        assert words[:len(launcher)] == launcher
        assert os.path.samefile(words[len(launcher)], REPO / "main.py")
        again = configure(words[len(launcher) + 1:])
        unlock_run()
        for key in ("version", "total_step", "g_lr", "seed", "log_path", "model_save_path", "imsize", "batch_size"):
            assert getattr(again, key) == getattr(cfg, key), key
        assert again.resume and again.pretrained_model is None
        assert words.count("--resume") == 1 and not any(w.startswith("--pretrained_model") for w in words)


# ---------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("seed", ["18446744073709551616", "-1"])
def test_a_seed_out_of_range_is_one_line(tmp_path, seed):
    err = one_line(run_main(step_args(tmp_path, "--version", "x", "--total_step", "2", "--seed", seed), cwd=tmp_path))
    assert "--seed" in err and "out of range" in err


def test_a_value_argparse_reads_as_a_flag_names_the_spelling_it_takes(tmp_path):
    import fid
    # argparse takes "-1" as a value but "-1,2" as a flag; its own words are "expected one argument"
    err = one_line(run_main(["--span", "0,3", "--seed", "-1,2"], cwd=tmp_path))
    assert "argument --seed: expected one argument; -1,2 reads as a flag: write --seed=-1,2" in err
    assert "write --seed=" not in one_line(run_main(["--seed"], cwd=tmp_path))  # nothing after it: no hint
    # the spelling it names is read as the value (here out of range, which the next message says)
    assert "--seed -1 is out of range" in one_line(run_main(["--span", "0,3", "--seed=-1,2"], cwd=tmp_path))
    err = one_line(run_main(["a", "b", "--batch_size", "-5,3"], cwd=tmp_path, entry=fid.main))
    assert "write --batch_size=-5,3" in err


def test_speed_flags_resolve_to_the_plain_path_on_cpu():
    cfg = configure(["--device", "cpu"])
    assert (cfg.amp, cfg.compile, cfg.channels_last, cfg.cache, cfg.cuda_graph) == ("none", "none", False, False, False)
    cfg = configure(["--device", "cpu", "--amp", "bf16", "--channels_last", "--cache", "true"])
    assert (cfg.amp, cfg.channels_last, cfg.cache) == ("bf16", True, True)


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--cuda_graph"], "--cuda_graph needs a CUDA device"),
    (["--device", "cpu", "--compile", "default", "--adv_loss", "wgan-gp"], "no double backward"),
    # modes --help does not offer (the step is already one CUDA graph) are refused like any bad choice
    (["--device", "cpu", "--compile", "reduce-overhead"], "invalid choice: 'reduce-overhead'"),
    (["--device", "cpu", "--compile", "max-autotune"], "invalid choice: 'max-autotune'"),
    (["--device", "cpu", "--channels_last", "maybe"], "expected true or false"),
])
def test_speed_flag_combinations_that_cannot_run_are_refused_in_one_line(capsys, args, message):
    import main
    with pytest.raises(SystemExit) as e:
        main.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------- attention settings (issue 22)
def test_attention_defaults_and_run_names():
    cfg = configure(["--span", "3"])
    assert (cfg.fully_masked, cfg.original_attention, cfg.version) == ("seed", False, "sagan_emoji_span3")
    assert configure(["--span", "3", "--fully_masked", "mean"]).version == "sagan_emoji_span3_mean"
    cfg = configure(["--original_attention"])
    assert cfg.original_attention is True and cfg.version == "sagan_emoji_span0_original"
    assert configure(["--span", "none"]).version == "sagan_emoji_spannone"
    assert configure(["--g_span", "none", "--d_span", "4"]).version == "sagan_emoji_gnone_d4"


@pytest.mark.parametrize("args, message", [
    (["--original_attention", "--mask_mode", "post"], "drop --mask_mode post"),
    (["--original_attention", "--fully_masked", "mean"], "drop --fully_masked mean"),
    (["--span", "none,x"], "argument --span: expected a span"),
    (["--span", "3", "--g_span", "1", "--d_span", "2"], "drop --span"),
])
def test_contradictory_attention_flags_are_one_line(tmp_path, args, message):
    assert message in one_line(run_main(["--device", "cpu", *args], cwd=tmp_path))


def test_the_resume_hint_writes_no_attention_as_none():
    for flags in (["--span", "none"], ["--g_span", "none", "--d_span", "2"]):
        cfg = configure(["--device", "cpu", *flags])
        words = shlex.split(resume_command(cfg))
        again = configure(words[2:-1])  # without --resume: nothing to resume here
        assert (again.g_span, again.d_span, again.span) == (cfg.g_span, cfg.d_span, cfg.span)
        assert "none" in words
