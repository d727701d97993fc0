"""Error types shared by every layer of the codec.

Each error carries an exit code, so the CLI can map any failure to a documented
non-zero exit status and a one-line message without a traceback.  This module
must stay import-light (no torch, no numpy): ``codec info`` depends on it.
"""

from __future__ import annotations


class CodecError(Exception):
    """Base class: a failure we can explain to the user in one line."""

    exit_code = 1


class BadInputError(CodecError):
    """The input is not something we can encode or decode (not an image, not a .lic file, bad size)."""

    exit_code = 3


class NotALicFileError(BadInputError):
    """The data does not start with the .lic magic bytes."""


class UnsupportedVersionError(BadInputError):
    """The .lic file was written by a newer, incompatible version of the format."""


class LimitExceededError(BadInputError):
    """A declared size (pixels, stream length, metadata) exceeds the configured limits."""


class CorruptFileError(CodecError):
    """The file is damaged: truncated, CRC mismatch, or an inconsistent structure."""

    exit_code = 4


class TruncatedFileError(CorruptFileError):
    """The file ends before the structure it declares."""


class CrcMismatchError(CorruptFileError):
    """A CRC32 check failed: the bytes were altered after encoding."""


class DeviceMismatchError(CorruptFileError):
    """The streams are intact but decode differently here than where they were encoded."""


class ModelError(CodecError):
    """The model or its weights are missing, unknown, or do not match the file."""

    exit_code = 5


class UnknownModelError(ModelError):
    pass


class WeightsMismatchError(ModelError):
    pass


class MissingWeightsError(ModelError):
    pass


class OutputExistsError(CodecError):
    """Refusing to overwrite an existing output without --force."""

    exit_code = 6


class Interrupted(CodecError):
    """Ctrl-C (SIGINT), SIGTERM or SIGHUP stopped the command; no partial output is left."""

    exit_code = 130


class SymbolMismatchError(CorruptFileError):
    """The stream's bytes are intact but decode to other symbols than the encoder coded: the decoder
    chose different CDF tables than the encoder (a different device or float path), or a bug."""


class DamagedMagicError(NotALicFileError, CrcMismatchError):
    """Bad magic bytes on an otherwise intact version-1 header (its CRC32 matches with the right
    magic): a corrupt .lic file rather than another kind of file (exit status 4)."""

    exit_code = CrcMismatchError.exit_code


class DamagedVersionError(UnsupportedVersionError, CrcMismatchError):
    """An unknown format version a bit or two away from a supported one, on a header whose CRC32
    matches that version: a damaged version field rather than a newer file (exit status 4)."""

    exit_code = CrcMismatchError.exit_code


class WeightsFileError(ModelError, ValueError):
    """A safetensors weights file whose structure is inconsistent (e.g. a broken alias)."""


class MissingExtrasError(CodecError):
    """The optional packages a command needs are not installed (codec bench, codec batch)."""

    exit_code = 3
