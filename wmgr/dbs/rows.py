"""Table data as LOAD DATA reads it: the load options, gunzip as a stream, and (for backends that
insert rows themselves) the rows of the text.

Everything works on iterators of blocks, so a file of any size passes through in bounded memory.
The row reader follows LOAD DATA's rules: FIELDS TERMINATED BY (delimiter), ENCLOSED BY
(enclose: optional quoting, a doubled quote inside), ESCAPED BY (escape: \\N is NULL, \\t \\n \\r \\0
\\b \\Z, anything else stands for itself; an escaped delimiter or line end is data), LINES
TERMINATED BY (terminate); with an enclose character, an unquoted NULL is NULL too.
"""

from __future__ import annotations

import codecs
import re
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional
from urllib.parse import parse_qsl

from wmgr.dbs.errors import IllegalOption, InvalidArgument

_FLAGS = {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}
_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}
# Decompressed output is produced at most this much at a time (a gzip bomb stays bounded).
MAX_INFLATE = 256 * 1024


@dataclass(frozen=True)
class LoadOptions:
    delimiter: str = "\t"
    enclose: str = ""
    escape: str = "\\"
    terminate: str = "\n"
    compressed: Optional[bool] = None  # None: guessed from the file name

    @classmethod
    def parse(cls, text: str) -> "LoadOptions":
        """The load-options field: a urlencoded string of the keys above."""
        values: dict = {}
        try:
            pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text.strip()))
        except ValueError:
            raise InvalidArgument(f"load-options is not a urlencoded string: {text[:100]!r}") from None
        for key, value in pairs:
            if key not in ("delimiter", "enclose", "escape", "terminate", "compressed"):
                raise IllegalOption(f"Illegal option: {key!r}")
            if key == "compressed":
                # The official client sends the terminate argument's value here (None, usually):
                # a value that is not a flag means "guess from the file name".
                values[key] = _FLAGS.get(value.strip().lower())
            else:
                values[key] = value
        options = cls(**values)
        if not options.delimiter or not options.terminate:
            raise InvalidArgument("delimiter and terminate must not be empty")
        if len(options.enclose) > 1 or len(options.escape) > 1:
            raise InvalidArgument("enclose and escape must be one character or empty")
        if options.delimiter == options.terminate:
            raise InvalidArgument("delimiter and terminate must differ")
        return options

    def gzipped(self, filename: Optional[str]) -> bool:
        return self.compressed if self.compressed is not None else bool(filename and filename.endswith(".gz"))


def gunzip(blocks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream (several members too, as `cat a.gz b.gz` makes) block by block."""
    inflater, started = zlib.decompressobj(wbits=31), False
    try:
        for block in blocks:
            data = block
            while data:
                started = True
                out = inflater.decompress(data, MAX_INFLATE)
                if out:
                    yield out
                if inflater.eof:
                    data = inflater.unused_data
                    inflater, started = zlib.decompressobj(wbits=31), False
                else:
                    data = inflater.unconsumed_tail
        if started:
            raise InvalidArgument("table-data is not valid gzip: it ends inside a compressed stream")
    except zlib.error as e:
        raise InvalidArgument(f"table-data is not valid gzip: {e}") from None


def _field_pattern(options: LoadOptions) -> re.Pattern:
    delim, esc, enc = (re.escape(x) for x in (options.delimiter, options.escape, options.enclose))
    plain = f"(?:(?!{delim})[^{esc}]|{esc}.)*" if options.escape else f"(?:(?!{delim}).)*"
    if options.enclose:
        inner = f"(?:[^{enc}{esc}]|{esc}.|{enc}{enc})*" if options.escape else f"(?:[^{enc}]|{enc}{enc})*"
        return re.compile(f"{enc}(?P<quoted>{inner}){enc}(?={delim}|\\Z)|(?P<plain>{plain})", re.S)
    return re.compile(f"(?P<plain>{plain})", re.S)


class RowReader:
    """Rows (lists of str or None) from decoded text blocks."""

    def __init__(self, options: LoadOptions) -> None:
        self.options = options
        self._field = _field_pattern(options)
        self._unescape = re.compile(re.escape(options.escape) + "(.)", re.S) if options.escape else None
        self.line = 0

    def _value(self, text: str, quoted: bool) -> Optional[str]:
        o = self.options
        if o.escape and text == o.escape + "N" and not quoted:
            return None
        if not quoted and o.enclose and text == "NULL":
            return None
        if quoted and o.enclose:
            text = text.replace(o.enclose * 2, o.enclose)
        if self._unescape is not None and o.escape in text:
            text = self._unescape.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), text)
        return text

    def _slow(self, record: str) -> Optional[list[Optional[str]]]:
        """A record with escapes or quotes; None if it goes on past this line (an escaped or
        quoted line end)."""
        fields, pos, delim = [], 0, self.options.delimiter
        while True:
            m = self._field.match(record, pos)
            quoted = m.group("quoted") if "quoted" in self._field.groupindex else None
            if quoted is not None:
                fields.append(self._value(quoted, True))
            elif self.options.enclose and record.startswith(self.options.enclose, pos):
                return None  # an open quote: the record goes on past this line end
            else:
                fields.append(self._value(m.group("plain"), False))
            pos = m.end()
            if pos == len(record):
                return fields
            if record.startswith(delim, pos):
                pos += len(delim)
                continue
            return None  # stopped inside an open quote or on an escape at the end

    def _ends_escaped(self, record: str) -> bool:
        esc = self.options.escape
        if not esc or not record.endswith(esc):
            return False
        return (len(record) - len(record.rstrip(esc))) % 2 == 1

    def _escaped(self, record: str) -> list[Optional[str]]:
        """A record with escapes but no quotes: split, then a field ending in an escaped
        delimiter joined with the next, \\N made NULL and escapes undone."""
        o = self.options
        null, out, carry = o.escape + "N", [], None
        for field in record.split(o.delimiter):
            if carry is not None:
                field, carry = carry + o.delimiter + field, None
            if field.endswith(o.escape) and self._ends_escaped(field):
                carry = field
                continue
            out.append(field if o.escape not in field else None if field == null else self._value(field, False))
        if carry is not None:
            out.append(self._value(carry, False))
        return out

    def _record(self, record: str) -> Optional[list[Optional[str]]]:
        o = self.options
        if o.enclose and o.enclose in record:
            return None if self._ends_escaped(record) else self._slow(record)
        if o.escape and o.escape in record:
            return None if self._ends_escaped(record) else self._escaped(record)
        return record.split(o.delimiter)

    def rows(self, texts: Iterable[str]) -> Iterator[list[list[Optional[str]]]]:
        """Batches of rows, one batch per block of text."""
        o = self.options
        special = [c for c in (o.escape, o.enclose) if c]
        pending = ""
        for text in texts:
            joined = pending + text
            records = joined.split(o.terminate)
            pending = records.pop()
            if not any(c in joined for c in special):
                self.line += len(records)
                yield [r.split(o.delimiter) for r in records]
                continue
            batch, carry = [], None
            for record in records:
                if carry is not None:
                    record, carry = carry + o.terminate + record, None
                fields = self._record(record)
                if fields is None:
                    carry = record
                    continue
                self.line += 1
                batch.append(fields)
            if carry is not None:
                pending = carry + o.terminate + pending
            yield batch
        if pending:
            fields = self._record(pending)
            if fields is None:
                raise InvalidArgument(f"line {self.line + 1}: the last record is cut short (an open quote or escape)")
            self.line += 1
            yield [fields]


def decode(blocks: Iterable[bytes]) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        for block in blocks:
            text = decoder.decode(block)
            offset += len(block)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"table-data is not UTF-8 text (near byte {offset + e.start})") from None
