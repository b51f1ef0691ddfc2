"""`sptlm` error handling: a UserError is one line on stderr and exit 1, found before anything is
written; any other exception is a bug and keeps its traceback."""

import pathlib

import pytest

from sptlm import cli, config, errors

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.py")
SPEECH = str(ROOT / "configs" / "speech_tokenizer_tiny.py")


def _train_raises(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
  """Makes `sptlm train` raise `exc` once its arguments are parsed."""

  def cmd_train(args, overrides) -> int:
    raise exc

  monkeypatch.setattr(cli, "cmd_train", cmd_train)


@pytest.mark.parametrize("exc", [
    errors.UserError("train.init_from='x' holds no checkpoint"),
    config.ConfigError("model.remat='dot' is not one of: none, full"),
    errors.MissingFileError("corpus not found: /nope.txt (set data.corpus)"),
    errors.InputError("corpus /x.txt has no non-empty documents"),
])
def test_a_user_error_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture, exc: Exception) -> None:
  _train_raises(monkeypatch, exc)
  assert cli.main(["train"]) == 1
  captured = capsys.readouterr()
  assert captured.err == f"sptlm train: error: {exc}\n"
  assert captured.out == ""


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
  _train_raises(monkeypatch, KeyboardInterrupt())
  assert cli.main(["train"]) == 130
  assert capsys.readouterr().err == "sptlm train: interrupted\n"
  with pytest.raises(KeyboardInterrupt):  # --verbose keeps the traceback
    cli.main(["--verbose", "train"])


@pytest.mark.parametrize("exc", [
    RuntimeError("a bug"), ValueError("a bug"), FileNotFoundError("a bug"), KeyError("a bug"),
    ZeroDivisionError("a bug"),
])
def test_an_internal_error_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture,
                                               exc: Exception) -> None:
  _train_raises(monkeypatch, exc)
  with pytest.raises(type(exc)) as info:
    cli.main(["train"])
  assert info.value is exc  # not swallowed, not re-wrapped
  assert "error:" not in capsys.readouterr().err


def test_verbose_shows_the_traceback_of_a_user_error_too(monkeypatch: pytest.MonkeyPatch) -> None:
  exc = errors.UserError("bad input")
  _train_raises(monkeypatch, exc)
  with pytest.raises(errors.UserError) as info:
    cli.main(["-v", "train"])
  assert info.value is exc


def test_every_module_error_type_is_a_user_error() -> None:
  from sptlm import aot
  from sptlm.convert import ConversionError
  from sptlm.speech.audio import AudioError
  from sptlm.train.loop import TrainingError
  for error_type in (config.ConfigError, ConversionError, aot.AotError, AudioError,
                     TrainingError, errors.MissingFileError, errors.InputError):
    assert issubclass(error_type, errors.UserError), error_type
  for error_type in (config.ConfigError, ConversionError, aot.AotError, AudioError,
                     errors.InputError):
    assert issubclass(error_type, ValueError), error_type  # Python callers that catch that
  assert issubclass(errors.MissingFileError, FileNotFoundError)
  assert not hasattr(cli, "UserError") or cli.UserError is errors.UserError


def test_a_bad_config_value_stops_before_the_workdir_is_made(tmp_path: pathlib.Path,
                                                             capsys: pytest.CaptureFixture) -> None:
  workdir = tmp_path / "run"
  assert cli.main(["train", "--config", TINY, "--config.model.remat=bogus",
                   "--workdir", str(workdir)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert err == ["sptlm train: error: model.remat='bogus' is not one of: "
                 "none, full, dots, dots_no_batch, attention_out"]
  assert not workdir.exists()


def test_a_bad_speech_config_value_stops_before_the_workdir_is_made(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
  workdir = tmp_path / "run"
  assert cli.main(["tokenizer", "train", "--config", SPEECH, "--config.model.positions=alibi",
                   "--workdir", str(workdir)]) == 1
  err = capsys.readouterr().err.splitlines()
  assert err == ["sptlm tokenizer: error: model.positions='alibi' is not one of: "
                 "sinusoid, rope"]
  assert not workdir.exists()


@pytest.mark.parametrize("argv, message", [
    (["train", "--coordinator", "localhost:1234"],
     "--coordinator needs --num-processes and --process-id"),
    (["tokenizer", "encode", "--workdir", "{tmp}/run", "--list", "{tmp}/missing.txt"],
     "--list {tmp}/missing.txt: No such file or directory"),
    (["tokenizer", "encode", "--workdir", "{tmp}/run"], "no audio given"),
    (["tokenizer", "transcribe", "--workdir", "{tmp}/run", "a.wav", "--tokens", "t.jsonl"],
     "give either AUDIO files (or --list) or --tokens FILE.jsonl"),
    (["tokenizer", "build-corpus", "--out", "{tmp}/corpus", "--text", "{tmp}/missing.txt"],
     "text source not found: {tmp}/missing.txt"),
    (["tokenizer", "encode", "--workdir", "{tmp}/run", "--config.train.steps=3", "a.wav"],
     "--config.train.steps=3: --config.KEY=VALUE overrides apply to `tokenizer train`"),
])
def test_bad_flags_and_missing_inputs_are_one_line(tmp_path: pathlib.Path,
                                                   capsys: pytest.CaptureFixture,
                                                   argv: list[str], message: str) -> None:
  argv = [a.format(tmp=tmp_path) for a in argv]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith(f"sptlm {argv[0]}: error: "), err
  assert message.format(tmp=tmp_path) in err[0]


def test_missing_text_input_files_are_user_errors(tmp_path: pathlib.Path) -> None:
  from data_pipelines import text_input
  with pytest.raises(errors.MissingFileError, match="corpus not found: .*nope.txt"):
    text_input.read_documents(tmp_path / "nope.txt")
  with pytest.raises(errors.MissingFileError, match="text tokenizer not found: .*nope.model"):
    text_input.load_tokenizer(tmp_path / "nope.model", 1024)
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  with pytest.raises(errors.InputError, match="latin1.txt is not UTF-8"):
    text_input.read_documents(tmp_path / "latin1.txt")


def test_the_9b_config_refuses_a_tokenizer_that_is_not_its_own(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture) -> None:
  """GLM-4's 151,552-row text table fed 1,024 SentencePiece ids: refused in one line, before a
  parameter is made (the model would never see most of its rows)."""
  workdir = tmp_path / "run"
  nine = str(pathlib.Path(TINY).parent / "glm4_9b.py")
  argv = ["train", "--config", nine, "--workdir", str(workdir), "--config.mesh.data=-1",
          "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
          "--config.vocab.text_tokenizer=data_pipelines/assets/tiny_sp1024.model",
          "--config.data.corpus=data_pipelines/assets/tinyshakespeare.txt"]
  assert cli.main(argv) == 1
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "has 1,024 ids but vocab.text_size is 151,552" in err[0], err
  assert not (workdir / "checkpoints").exists() and not (workdir / "config.json").exists()
  assert cli.main(argv[:-2]) == 1  # the config's own placeholder path: named, one line
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and "text tokenizer not found: " in err[0], err
  assert "checkpoints/glm-4-9b" in err[0]
