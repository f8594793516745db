"""Which parts of the evaluator's fast path go on, by the installed transformers' version."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

# The transformers releases the shortcuts are tested on: [lowest, upper) as in pyproject.toml's
# requirement, whose bound must equal it (a test checks). CI runs the evaluator's tests on the
# newest release below `upper` and on `lowest` (scripts/test.sh). Both parts rely on
# transformers' internals (the AttentionInterface call's keyword arguments, the cache keyword,
# the Llama-family layer forwards the patched ones copy), hence the gate (see parts_wanted).
TESTED_TRANSFORMERS = ("5.0", "5.25")
_told: set[tuple[str, bool | None]] = set()  # gate lines already logged in this process
_told_lock = threading.Lock()


def reset() -> None:
    """Forget which gate lines were logged (each is logged again once)."""
    with _told_lock:
        _told.clear()


def transformers_version() -> str:
    """The installed transformers' version (read at each installation)."""
    import transformers

    return transformers.__version__


def tested_range() -> str:
    """:data:`TESTED_TRANSFORMERS` as a requirement specifier, e.g. ``>=5.0,<5.25``."""
    lowest, upper = TESTED_TRANSFORMERS
    return f">={lowest},<{upper}"


def version_tested(version: str) -> bool:
    """Whether ``version`` is a release in :data:`TESTED_TRANSFORMERS` (pre-releases and
    development builds are not: PEP 440 specifiers exclude them)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) in SpecifierSet(tested_range())
    except InvalidVersion:
        return False


def parts_wanted(requested: bool | None) -> tuple[bool, bool]:
    """Which parts of the fast path go on: (the AttentionInterface function, the patched
    layer forwards). ``requested`` is ``eval.fast_layers``.

    On a transformers release in :data:`TESTED_TRANSFORMERS`: the attention part, and the
    layers unless ``requested`` is False. Outside it: nothing unless ``requested`` is True
    (both parts, with a warning; the evaluator's run-time check still falls back where they
    do not match), the plain forward instead; one line says so (once per process and
    version)."""
    version = transformers_version()
    if version_tested(version):
        return True, requested is not False
    told = (version, requested) in _told
    _told.add((version, requested))
    if requested:
        if not told:
            log.warning("eval.fast_layers=true on transformers %s, which the tests do not "
                        "cover (%s): the evaluator's shortcuts rely on its internals and may "
                        "not match them (its run-time check falls back if they do not)",
                        version, tested_range())
        return True, True
    if not told:
        log.info("the evaluator's shortcuts are off (plain forward, slower): transformers %s "
                 "is not a release the tests cover (%s; eval.fast_layers=true forces them)",
                 version, tested_range())
    return False, False
