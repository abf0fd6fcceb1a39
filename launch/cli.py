"""What every launch tool shares: --help, one-line errors and exit codes, configs by name,
quiet logs.

Every tool calls `cli.run(main, example=...)` instead of `app.run(main)`:

- `--help` (`-h`, `--helpshort`) prints a usage example first, then the tool's description
  and its own flags, for `python -m launch.X` and the `moemil-X` console script alike
  (absl's own help lists the flags of `sys.argv[0]`, which for a console script is the
  wrapper, not the module). `--helpfull` is absl's, with every library's flags.
- Exit status: 0 done; 1 done, with failures the tool's summary names (extraction: rejected
  manifest rows or failed items); 2 a mistake the user can fix, told in one line on stderr
  that says what is wrong and what to do (`USER_ERRORS`, bad flags, unknown config keys);
  130 interrupted (Ctrl-C), with one line saying what was kept and how to go on.
  `--verbose` or MOEMIL_VERBOSE=1 adds the traceback.
- `--config=moemil` (dlr, pathomics, paper, test) names a packaged config; a path still
  works, and `moemil_jax/configs/NAME.py` works from any directory.
- Library noise (orbax's per-checkpoint INFO lines, the TPU-backend probe, NumExpr's thread
  count, tensorboardX's NaN warnings, extraction's line per slide, the same INFO line
  repeated) is hidden unless `--verbose`; warnings and errors always show.
"""

from __future__ import annotations

import difflib
import logging as std_logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from absl import app, flags, logging

EXIT_FAILURES = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
VERBOSE_ENV = 'MOEMIL_VERBOSE'
CONFIG_DIR = Path(__file__).resolve().parents[1] / 'moemil_jax' / 'configs'
# Tools with a console script (pyproject.toml [project.scripts]).
CONSOLE_SCRIPTS = ('synth', 'extract', 'train', 'evaluate', 'sweep', 'explain', 'predict', 'bench')
HELP_ARGS = ('-h', '--help', '-help', '--helpshort', '-helpshort', '-?')

# Exceptions that mean "the input is wrong", by dotted name: matched only when their module
# is already imported (an exception cannot be an instance of a class never loaded), so this
# module imports neither torch nor jax.
USER_ERRORS = (
  'feature_store.store.StoreError',
  'feature_store.manifest.ManifestError',
  'feature_store.encoders.EncoderError',
  'moemil_jax.splits.SplitError',
  'moemil_jax.evaluation.EvaluationError',
  'moemil_jax.heatmaps.HeatmapError',
  'moemil_jax.bundle.BundleError',
  'launch.cli.UserError',
)

_VERBOSE = flags.DEFINE_bool(
  'verbose',
  False,
  f'Show tracebacks with errors and the INFO logs of libraries (or set {VERBOSE_ENV}=1).',
)

# Loggers whose INFO lines say nothing a user acts on.
_QUIET_LOGGERS = {
  'jax._src.xla_bridge': std_logging.WARNING,  # "Unable to initialize backend 'tpu'"
  'numexpr': std_logging.WARNING,  # "NumExpr defaulting to N threads"
  'tensorboardX': std_logging.ERROR,  # "NaN or Inf found in input tensor" per NaN scalar
  'feature_store.extract.items': std_logging.WARNING,  # one INFO line per slide extracted
}
_EPOCH_LINE = re.compile(r'^(?:sweep )?epoch (\d+)/(\d+):')


class UserError(Exception):
  """A mistake the user can fix; the message says what is wrong and what to do."""


def packaged_configs() -> list[str]:
  return sorted(p.stem for p in CONFIG_DIR.glob('*.py') if not p.stem.startswith('_'))


def verbose(argv: Sequence[str] | None = None) -> bool:
  """--verbose (parsed, or on the command line before parsing) or MOEMIL_VERBOSE=1."""
  if os.environ.get(VERBOSE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
    return True
  if flags.FLAGS.is_parsed():
    return bool(_VERBOSE.value)
  return '--verbose' in (sys.argv if argv is None else argv)


def tool_name() -> str:
  """'launch.train' under `python -m`, 'moemil-train' as a console script."""
  prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else 'launch'
  if prog.endswith('.py'):
    return f'launch.{prog[:-3]}'
  return prog


def fail(message: str, code: int = EXIT_USER_ERROR) -> None:
  """Prints `message` as one line on stderr and exits with `code`."""
  line = ' '.join(str(message).split())  # one line, whatever the message held
  sys.stdout.flush()
  sys.stderr.write(f'{tool_name()}: error: {line}\n')
  sys.stderr.flush()
  sys.exit(code)


# --------------------------------------------------------------------------- configs


def resolve_config(value: str) -> str:
  """A `--config` value as config_flags loads it: a packaged config's name (moemil, dlr,
  ...) or a missing `.../moemil_jax/configs/NAME.py` becomes the packaged file; an existing
  path is kept. A trailing `:ARG` (config_flags' argument) is kept."""
  path, sep, arg = value.partition(':')
  if not path or Path(path).is_file():
    return value
  name = path[:-3] if path.endswith('.py') else path
  packaged = CONFIG_DIR / f'{Path(name).name}.py'
  looks_packaged = '/' not in name or Path(path).parent.as_posix().endswith('moemil_jax/configs')
  if looks_packaged and packaged.is_file():
    return f'{packaged}{sep}{arg}'
  raise UserError(
    f'--config={value}: no such file, and not a packaged config; give a config file or one of '
    f'{", ".join(packaged_configs())}'
  )


def _resolve_config_args(argv: list[str]) -> list[str]:
  out = list(argv)
  for i, a in enumerate(out):
    if a == '--':
      break
    if a.startswith('--config='):
      out[i] = '--config=' + resolve_config(a[len('--config=') :])
    elif a == '--config' and i + 1 < len(out):
      out[i + 1] = resolve_config(out[i + 1])
  return out


def config_label(argv: Sequence[str], extra: dict | None = None) -> str:
  """`config: moemil, overrides: train.epochs=4, store=...` from the command line."""
  name, overrides = '?', []
  args = list(argv)
  for i, a in enumerate(args):
    if a.startswith('--config='):
      name = Path(a.split('=', 1)[1].partition(':')[0]).stem
    elif a == '--config' and i + 1 < len(args):
      name = Path(args[i + 1].partition(':')[0]).stem
    elif a.startswith('--config.'):
      key, eq, val = a[len('--config.') :].partition('=')
      if not eq and i + 1 < len(args) and not args[i + 1].startswith('-'):
        val = args[i + 1]
      overrides.append(f'{key}={val}' if (eq or val) else key)
    elif a.startswith('--noconfig.'):
      overrides.append(f'{a[len("--noconfig.") :]}=False')
  overrides += [f'{k}={v}' for k, v in (extra or {}).items() if v is not None]
  return f'config: {name}, overrides: {", ".join(overrides) if overrides else "none"}'


def _load_config_file(value: str):
  import importlib.util

  path = value.partition(':')[0]
  spec = importlib.util.spec_from_file_location('_moemil_config_check', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _bad_config_override(argv: Sequence[str]) -> str | None:
  """The one-line reason why a `--config.KEY=VALUE` is refused, or None."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg is None and '--config' in argv:
    i = list(argv).index('--config')
    config_arg = argv[i + 1] if i + 1 < len(argv) else None
  try:
    config = _load_config_file(config_arg) if config_arg else None
  except Exception:  # the config file itself is broken: the traceback says more
    return None
  if config is None:
    return None
  for a in argv:
    if a.startswith('--noconfig.'):
      key = a[len('--noconfig.') :]
    elif a.startswith('--config.'):
      key = a[len('--config.') :].partition('=')[0]
    else:
      continue
    node, walked = config, ['config']
    for part in key.split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        where = '.'.join(walked)
        close = difflib.get_close_matches(part, keys, n=1)
        hint = f'did you mean {where}.{close[0]}?' if close else f'its keys: {", ".join(keys)}'
        if not keys:
          hint = f'{where} is a value, not a group'
        return f'{a}: {where} has no key {part!r}; {hint}'
      node = node[part]
      walked.append(part)
  return None


# --------------------------------------------------------------------------- help


def _module_flag_key(module) -> str | None:
  names = {module.__name__}
  if module.__name__ == '__main__':
    names |= {sys.argv[0], os.path.abspath(getattr(module, '__file__', '') or '')}
  for key in flags.FLAGS.flags_by_module_dict():
    if key in names or os.path.abspath(key) in names:
      return key
  return None


def help_text(module, example: str) -> str:
  """A usage example first, the tool's description, then its flags and the common ones."""
  short = Path(module.__file__).stem
  lines = [f'usage: python -m launch.{short} {example}']
  if short in CONSOLE_SCRIPTS:
    lines.append(f'   or: moemil-{short} {example}')
  doc = (module.__doc__ or '').strip('\n')
  if doc:
    lines += ['', doc.rstrip()]
  key = _module_flag_key(module)
  body = flags.FLAGS.module_help(key) if key else ''
  body = body.strip('\n').split('\n', 1)[1] if '\n' in body.strip('\n') else ''
  lines += ['', 'flags:', body.rstrip()] if body.strip() else []
  notes = []
  if 'config' in flags.FLAGS:
    notes.append(
      f'--config: a packaged config ({", ".join(packaged_configs())}) or a config file; '
      'override any value with --config.KEY=VALUE, e.g. --config.train.epochs=10 (run.json '
      'of a training run holds every key).'
    )
  notes += [
    f"--verbose: {flags.FLAGS['verbose'].help} --helpfull: every flag, the libraries' too.",
    'exit status: 0 done; 1 done with failures (the summary says which); 2 a mistake to fix '
    '(one line says what); 130 interrupted.',
  ]
  for note in notes:
    lines += ['', textwrap.fill(note, 90)]
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------- logs


class _QuietFilter(std_logging.Filter):
  """On the absl handler: hides orbax's INFO lines and an INFO line identical to an earlier
  one (e.g. the same preprocessing summary for each of five folds)."""

  def __init__(self):
    super().__init__()
    self._seen: set[tuple[str, str]] = set()

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    if f'{os.sep}orbax{os.sep}' in (record.pathname or ''):
      return False
    key = (record.pathname, record.getMessage())
    if key in self._seen:
      return False
    if len(self._seen) < 10_000:
      self._seen.add(key)
    return True


class EpochFilter(std_logging.Filter):
  """Shows the per-epoch line of the first epoch, every `every`-th, the last and (with
  `improvements`) each that improved the validation score (marked ' *')."""

  def __init__(self, every: int, improvements: bool = True):
    super().__init__()
    self.every, self.improvements = max(int(every), 1), improvements

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    message = record.getMessage()
    m = _EPOCH_LINE.match(message)
    if not m:
      return True
    epoch, total = int(m.group(1)), int(m.group(2))
    improved = ' * [' in message or message.rstrip().endswith(' *')
    return epoch in (1, total) or epoch % self.every == 0 or (self.improvements and improved)


def add_log_filter(f: std_logging.Filter) -> None:
  """Adds `f` to absl's handler unless --verbose (which shows every line)."""
  if not verbose():
    logging.get_absl_handler().addFilter(f)


def quiet_logs() -> None:
  """Raises the level of the noisy loggers and filters absl's handler (see the module doc)."""
  for name, level in _QUIET_LOGGERS.items():
    std_logging.getLogger(name).setLevel(level)
  logging.get_absl_handler().addFilter(_QuietFilter())


# --------------------------------------------------------------------------- errors


def _user_error_message(e: BaseException) -> str | None:
  """The one line to print for an exception the user can fix, else None."""
  if isinstance(e, app.UsageError):
    return f'{e}; see --help'
  if isinstance(e, FileExistsError):  # e.g. a --workdir that already holds another run
    return f'{e.filename}: already exists' if e.filename else str(e)
  if isinstance(e, (FileNotFoundError, NotADirectoryError, PermissionError)) and e.filename:
    what = e.strerror or type(e).__name__
    return f'{e.filename}: {what.lower()}; check the path'
  for dotted in USER_ERRORS:
    module, _, cls = dotted.rpartition('.')
    kind = getattr(sys.modules.get(module), cls, None)
    if kind is not None and isinstance(e, kind):
      return str(e) or type(e).__name__
  return None


def _flag_error_line(e: flags.Error) -> str:
  message = ' '.join(str(e).split())
  m = re.search(r'Flag --(\w+) must have a value other than None', message)
  if m:
    name = m.group(1)
    return f'--{name} is required ({flags.FLAGS[name].help.rstrip(".")}); see --help'
  return f'{message}; see --help'


def _parser(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_bad_config_override(argv) or _flag_error_line(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # ml_collections raises these while applying a --config.KEY=VALUE override.
    reason = _bad_config_override(argv)
    if reason is None and isinstance(e, OSError) and 'config' in flags.FLAGS:
      reason = str(e)
    if reason is None:
      raise
    if verbose(argv):
      traceback.print_exc()
    fail(reason)


_exiting = threading.Lock()
INTERRUPT_GRACE_S = 3.0


def _exit_interrupted(interrupted: str | Callable[[], str]) -> None:
  """Prints the interrupt line once and ends the process with status 130."""
  if not _exiting.acquire(blocking=False):
    return  # the other path (main thread or watchdog) is already exiting
  try:
    line = interrupted() if callable(interrupted) else interrupted
  except Exception:  # the flags it reads may be unset this early
    line = 'interrupted; run the same command again'
  sys.stdout.flush()
  sys.stderr.write(f'{tool_name()}: {line}\n')
  sys.stderr.flush()
  # Worker threads (slide readers, checkpoint writers) would otherwise keep the process
  # alive; every file is written atomically, so stopping here is as safe as a kill.
  os._exit(EXIT_INTERRUPTED)


def _on_ctrl_c(interrupted: str | Callable[[], str]) -> None:
  """SIGINT raises KeyboardInterrupt as usual (so `finally` blocks remove temporary files),
  and a watchdog ends the process if that exception is swallowed: Python can raise it inside
  a callback that ignores exceptions (JAX's garbage-collection hook does), and the run would
  go on as if nothing happened."""

  def handler(signum, frame):
    def watchdog():
      time.sleep(INTERRUPT_GRACE_S)
      _exit_interrupted(interrupted)

    threading.Thread(target=watchdog, daemon=True).start()
    raise KeyboardInterrupt

  signal.signal(signal.SIGINT, handler)
  previous_hook = sys.unraisablehook

  def unraisable(info):  # the swallowed KeyboardInterrupt: the watchdog reports it
    if not isinstance(info.exc_value, KeyboardInterrupt):
      previous_hook(info)

  sys.unraisablehook = unraisable


def run(
  main: Callable[[list[str]], object],
  *,
  example: str,
  interrupted: str | Callable[[], str] = 'interrupted; nothing half-written is kept: run the '
  'same command again',
) -> None:
  """app.run(main) with this module's help, errors, exit codes, config names and quiet logs.

  example: the flags of a typical call, shown first by --help.
  interrupted: the line printed on Ctrl-C (what was kept, how to go on), or a function
  returning it (called after flag parsing).
  """
  module = sys.modules[main.__module__]
  argv = list(sys.argv)
  if any(a in HELP_ARGS for a in argv[1 : argv.index('--') if '--' in argv else None]):
    sys.stdout.write(help_text(module, example))
    sys.exit(0)
  try:
    argv = _resolve_config_args(argv) if 'config' in flags.FLAGS else argv
  except UserError as e:
    fail(str(e))
  if not verbose(argv):
    quiet_logs()
  _on_ctrl_c(interrupted)

  def wrapped(args):
    try:
      return main(args)
    except KeyboardInterrupt:
      _exit_interrupted(interrupted)
    except BaseException as e:
      if isinstance(e, SystemExit):
        raise
      line = _user_error_message(e)
      if line is None:
        raise
      if verbose():
        traceback.print_exc()
      fail(line)

  app.run(wrapped, argv=argv, flags_parser=_parser)
