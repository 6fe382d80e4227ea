"""Closed option sets, volume sizes and the shared argparse types."""

import argparse

import pytest

from medvl.options import look_up_option, non_negative_int, parse_size, positive_int, size_argument, unknown_option

STRATEGIES = ("batch_hard", "semi_hard", "entities")


def test_look_up_option_gives_back_a_known_value():
    assert look_up_option("semi_hard", STRATEGIES, name="strategy") == "semi_hard"
    assert look_up_option("ct", {"ct": 1, "mr": 2}, name="kind") == "ct"  # a mapping's keys are its options
    assert look_up_option(None, (None, "auto"), name="backend") is None


def test_look_up_option_names_the_argument_the_value_and_the_choices():
    with pytest.raises(ValueError) as info:
        look_up_option("semihard", STRATEGIES, name="strategy")
    assert str(info.value) == ("strategy must be one of 'batch_hard', 'semi_hard', 'entities', got 'semihard'; "
                               "did you mean 'semi_hard'?")


def test_look_up_option_suggests_nothing_far_from_every_choice():
    with pytest.raises(ValueError) as info:
        look_up_option("metal", ("cpu", "cuda", "triton", "reference"), name="backend")
    assert "did you mean" not in str(info.value) and "got 'metal'" in str(info.value)
    with pytest.raises(ValueError, match=r"^reduction must be one of 'mean', 'sum', got 3$"):
        look_up_option(3, ("mean", "sum"), name="reduction")  # not a string: no suggestion


def test_unknown_option_is_the_error_look_up_option_raises():
    error = unknown_option("eucl", ("euclidean", "cosine"), name="distance")
    assert isinstance(error, ValueError)
    with pytest.raises(ValueError) as info:
        look_up_option("eucl", ("euclidean", "cosine"), name="distance")
    assert str(info.value) == str(error) and "did you mean 'euclidean'?" in str(error)


def test_parse_size():
    assert parse_size("64,64,32") == (64, 64, 32)
    assert parse_size("64x64x32") == (64, 64, 32)
    assert parse_size([32, 32, 16]) == (32, 32, 16)
    assert parse_size(8) == (8, 8, 8)
    for bad in ("64,64", "64,64,0", "a,b,c", (1, 2, 3, 4)):
        with pytest.raises(ValueError, match="size must be three"):
            parse_size(bad)


def test_argparse_types():
    assert size_argument("32,32,16") == (32, 32, 16)
    assert positive_int("3") == 3
    assert non_negative_int("0") == 0
    cases = [(size_argument, "32,32", "three positive integers"), (positive_int, "0", "positive integer"),
             (positive_int, "two", "positive integer"), (non_negative_int, "-1", "integer >= 0"),
             (non_negative_int, "1.5", "integer >= 0")]
    for parse, text, message in cases:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


def test_argparse_reports_the_option_with_the_error(capsys):
    parser = argparse.ArgumentParser(prog="medvl x")
    parser.add_argument("--size", type=size_argument)
    with pytest.raises(SystemExit):
        parser.parse_args(["--size", "1,2"])
    assert "--size: size must be three positive integers" in capsys.readouterr().err
