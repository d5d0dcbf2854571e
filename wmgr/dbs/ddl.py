"""MySQL's CREATE TABLE, read into a table model, and that model written out for SQLite and as
MySQL's SHOW CREATE TABLE / SHOW COLUMNS would show it.

Qserv's tools send MySQL DDL (MySQL types, ENGINE=..., KEY clauses, backquotes, charsets). The
SQLite backend keeps each column's MySQL type as the column's declared type (a quoted name such as
"int(11) unsigned", which SQLite accepts and from which it derives the right affinity), so
`columns` and `schema` answer with MySQL's types on both backends. What has no SQLite meaning
(partitions, foreign keys, generated columns, full-text indexes...) is refused with the reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Optional

from wmgr.dbs.errors import InvalidArgument
from wmgr.dbs.names import check_column

_TOKEN = re.compile(
    r"""(?P<space>\s+|--[^\n]*|\#[^\n]*|/\*.*?\*/)
      | (?P<ident>`(?:[^`]|``)*`)
      | (?P<string>'(?:[^'\\]|\\.|'')*'|"(?:[^"\\]|\\.|"")*")
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
      | (?P<word>[A-Za-z_$][\w$]*)
      | (?P<punct>[(),;=.+\-*/<>!%&|^~:@?{}\[\]])""",
    re.S | re.X,
)

_STRING_ESCAPES = {"0": "\0", "b": "\b", "n": "\n", "r": "\r", "t": "\t", "Z": "\x1a"}

# MySQL type (lower case) -> (MySQLdb FIELD_TYPE name for the index description, default
# arguments as MariaDB shows them, default arguments when unsigned).
_INTEGERS = {"tinyint": ("TINY", "4", "3"), "smallint": ("SHORT", "6", "5"), "mediumint": ("INT24", "9", "8"),
             "int": ("LONG", "11", "10"), "bigint": ("LONGLONG", "20", "20")}
_OTHER_TYPES = {
    "decimal": "NEWDECIMAL", "float": "FLOAT", "double": "DOUBLE", "bit": "BIT", "char": "STRING",
    "varchar": "VAR_STRING", "binary": "STRING", "varbinary": "VAR_STRING", "tinytext": "BLOB", "text": "BLOB",
    "mediumtext": "BLOB", "longtext": "BLOB", "tinyblob": "BLOB", "blob": "BLOB", "mediumblob": "BLOB",
    "longblob": "BLOB", "date": "DATE", "datetime": "DATETIME", "timestamp": "TIMESTAMP", "time": "TIME",
    "year": "YEAR", "enum": "STRING", "set": "STRING", "json": "BLOB",
}
_ALIASES = {"integer": "int", "int1": "tinyint", "int2": "smallint", "int3": "mediumint", "int4": "int",
            "int8": "bigint", "middleint": "mediumint", "dec": "decimal", "numeric": "decimal", "fixed": "decimal",
            "real": "double", "float8": "double", "float4": "float", "long": "mediumtext"}
_NEEDS_LENGTH = {"varchar", "varbinary"}
# The declared SQLite type of an AUTO_INCREMENT key: only this exact name makes a rowid alias.
AUTOINCREMENT_TYPE = "INTEGER"


@dataclass
class Column:
    name: str
    type: str  # as SHOW COLUMNS shows it: "int(11)", "varchar(32)", "bigint(20) unsigned"
    not_null: bool = False
    default: Optional[str] = None  # the value, as SHOW COLUMNS shows it (None: no default / NULL)
    default_is_expression: bool = False  # CURRENT_TIMESTAMP
    auto_increment: bool = False


@dataclass
class Index:
    name: str  # "PRIMARY" for the primary key
    columns: list[str]
    unique: bool

    @property
    def primary(self) -> bool:
        return self.name == "PRIMARY"


@dataclass
class Table:
    name: str
    columns: list[Column]
    indexes: list[Index] = field(default_factory=list)
    database: Optional[str] = None  # the qualifier the statement gave, if any

    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def field_type(self, column: str) -> str:
        """MySQLdb's FIELD_TYPE name for a column (the index answer's `description`)."""
        for c in self.columns:
            if c.name.lower() == column.lower():
                base = c.type.split("(")[0].split()[0]
                return _INTEGERS[base][0] if base in _INTEGERS else _OTHER_TYPES.get(base, "STRING")
        raise KeyError(column)

    def non_unique(self) -> "Table":
        """The overlap table's definition: every unique index (the primary key too, which becomes
        PRIMARY_NON_UNIQUE) made non-unique, since overlap rows may repeat."""
        indexes = [Index("PRIMARY_NON_UNIQUE" if i.primary else i.name, list(i.columns), False) for i in self.indexes]
        columns = [replace(c, auto_increment=False) for c in self.columns]
        return Table(self.name, columns, indexes)

    def with_chunk_columns(self) -> "Table":
        """chunkColumns: _chunkId and _subChunkId dropped, chunkId and subChunkId INT NOT NULL added."""
        drop = {"_chunkid", "_subchunkid"}
        columns = [c for c in self.columns if c.name.lower() not in drop]
        have = {c.name.lower() for c in columns}
        for name in ("chunkId", "subChunkId"):
            if name.lower() not in have:
                columns.append(Column(name, "int(11)", not_null=True))
        indexes = [i for i in self.indexes if not drop & {c.lower() for c in i.columns}]
        return Table(self.name, columns, indexes)


class _Tokens:
    def __init__(self, sql: str) -> None:
        self.items: list[tuple[str, str]] = []
        pos = 0
        while pos < len(sql):
            m = _TOKEN.match(sql, pos)
            if m is None:
                raise InvalidArgument(f"cannot read the schema at {sql[pos:pos + 20]!r}")
            pos = m.end()
            if m.lastgroup != "space":
                self.items.append((m.lastgroup or "", m.group()))
        self.pos = 0

    def peek(self, ahead: int = 0) -> tuple[str, str]:
        i = self.pos + ahead
        return self.items[i] if i < len(self.items) else ("end", "")

    def next(self) -> tuple[str, str]:
        token = self.peek()
        self.pos += 1
        return token

    def word(self, *words: str) -> bool:
        """Consume the next token if it is one of these words (case-insensitive)."""
        kind, text = self.peek()
        if kind == "word" and text.upper() in words:
            self.pos += 1
            return True
        return False

    def words(self, *sequence: str) -> bool:
        for i, expected in enumerate(sequence):
            kind, text = self.peek(i)
            if kind != "word" or text.upper() != expected:
                return False
        self.pos += len(sequence)
        return True

    def punct(self, char: str) -> bool:
        if self.peek() == ("punct", char):
            self.pos += 1
            return True
        return False

    def expect(self, char: str, where: str) -> None:
        if not self.punct(char):
            raise InvalidArgument(f"expected {char!r} {where}, found {self.peek()[1] or 'the end'!r}")

    def name(self, what: str) -> str:
        kind, text = self.next()
        if kind == "ident":
            return text[1:-1].replace("``", "`")
        if kind == "word":
            return text
        raise InvalidArgument(f"expected {what}, found {text or 'the end'!r}")

    def balanced(self) -> list[tuple[str, str]]:
        """The tokens of a parenthesised group (the opening one already consumed)."""
        depth, group = 1, []
        while True:
            kind, text = self.next()
            if kind == "end":
                raise InvalidArgument("unbalanced parentheses in the schema")
            if (kind, text) == ("punct", "("):
                depth += 1
            elif (kind, text) == ("punct", ")"):
                depth -= 1
                if depth == 0:
                    return group
            group.append((kind, text))


def string_value(token: str) -> str:
    quote, body = token[0], token[1:-1]
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            out.append(_STRING_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        elif ch == quote and body[i + 1:i + 2] == quote:
            out.append(quote)
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def read_header(sql: str) -> tuple[Optional[str], str, _Tokens]:
    """The database qualifier and table name of a CREATE TABLE statement, and its tokens
    positioned after the name. Anything but one plain CREATE TABLE is refused."""
    tokens = _Tokens(sql)
    if not tokens.word("CREATE"):
        raise InvalidArgument("the schema must be a CREATE TABLE statement")
    if tokens.word("TEMPORARY"):
        raise InvalidArgument("a TEMPORARY table would vanish with its connection")
    tokens.words("OR", "REPLACE")
    if not tokens.word("TABLE"):
        raise InvalidArgument("the schema must be a CREATE TABLE statement")
    if tokens.words("IF", "NOT", "EXISTS"):
        raise InvalidArgument("IF NOT EXISTS is not accepted: an existing table is reported as TableExists")
    database, name = None, tokens.name("a table name")
    if tokens.punct("."):
        database, name = name, tokens.name("a table name")
    after_name = tokens.pos
    if not tokens.punct("("):
        raise InvalidArgument("only a CREATE TABLE with column definitions is accepted (no LIKE or SELECT)")
    tokens.balanced()
    while True:
        kind, text = tokens.next()
        if kind == "end":
            break
        if kind == "word" and text.upper() in ("SELECT", "AS", "LIKE", "IGNORE", "REPLACE"):
            raise InvalidArgument("only a CREATE TABLE with column definitions is accepted (no SELECT)")
        if (kind, text) == ("punct", "(" ):
            tokens.balanced()
        elif (kind, text) == ("punct", ";") and tokens.peek()[0] != "end":
            raise InvalidArgument("the schema must be one statement")
    tokens.pos = after_name
    return database, name, tokens


def parse_create_table(sql: str) -> Table:
    """The table model of a MySQL CREATE TABLE; InvalidArgument says what cannot be mapped."""
    database, name, tokens = read_header(sql)
    tokens.expect("(", "after the table name")
    table = Table(name, [], database=database)
    while True:
        _definition(tokens, table)
        if tokens.punct(")"):
            break
        tokens.expect(",", "between definitions")
    _table_options(tokens)
    if not table.columns:
        raise InvalidArgument("the table has no columns")
    seen: set[str] = set()
    for column in table.columns:
        check_column(column.name)
        if column.name.lower() in seen:
            raise InvalidArgument(f"column {column.name} is defined twice")
        seen.add(column.name.lower())
    primaries = [i for i in table.indexes if i.primary]
    if len(primaries) > 1:
        raise InvalidArgument("the table has more than one primary key")
    names: set[str] = set()
    for index in table.indexes:
        check_column(index.name)
        if index.name.lower() in names:
            raise InvalidArgument(f"index {index.name} is defined twice")
        names.add(index.name.lower())
        for col in index.columns:
            if col.lower() not in seen:
                raise InvalidArgument(f"index {index.name} names column {col}, which the table does not have")
    for column in table.columns:
        if column.name.lower() in {c.lower() for p in primaries for c in p.columns}:
            column.not_null = True
        if column.auto_increment and not (primaries and [c.lower() for c in primaries[0].columns] == [column.name.lower()]
                                          and column.type.split("(")[0] in _INTEGERS):
            raise InvalidArgument(f"AUTO_INCREMENT column {column.name} must be an integer and the whole primary key")
    return table


def _definition(tokens: _Tokens, table: Table) -> None:
    if tokens.word("CONSTRAINT"):
        if tokens.peek()[0] in ("ident", "word") and tokens.peek()[1].upper() not in ("PRIMARY", "UNIQUE", "FOREIGN", "CHECK"):
            tokens.next()
    if tokens.words("PRIMARY", "KEY"):
        table.indexes.append(Index("PRIMARY", _key_parts(tokens, unique=True), True))
    elif tokens.word("UNIQUE"):
        tokens.word("KEY", "INDEX")
        name = _index_name(tokens)
        columns = _key_parts(tokens, unique=True)
        table.indexes.append(Index(name or columns[0], columns, True))
    elif tokens.word("KEY", "INDEX"):
        name = _index_name(tokens)
        columns = _key_parts(tokens, unique=False)
        table.indexes.append(Index(name or columns[0], columns, False))
    elif tokens.peek()[0] == "word" and tokens.peek()[1].upper() in ("FULLTEXT", "SPATIAL", "FOREIGN", "CHECK", "PERIOD"):
        raise InvalidArgument(f"{tokens.peek()[1].upper()} definitions cannot be mapped onto SQLite")
    else:
        _column(tokens, table)


def _index_name(tokens: _Tokens) -> Optional[str]:
    if tokens.peek() == ("punct", "(") or tokens.word("USING"):
        if tokens.peek() != ("punct", "("):
            tokens.next()
        return None
    name = tokens.name("an index name")
    if tokens.word("USING"):
        tokens.next()
    return name


def _key_parts(tokens: _Tokens, unique: bool) -> list[str]:
    tokens.expect("(", "before the key's columns")
    columns = []
    while True:
        columns.append(tokens.name("a column name"))
        if tokens.punct("("):
            tokens.balanced()
            if unique:
                raise InvalidArgument(f"a unique key on a prefix of column {columns[-1]} cannot be mapped onto SQLite")
        tokens.word("ASC", "DESC")
        if tokens.punct(")"):
            break
        tokens.expect(",", "between the key's columns")
    while tokens.peek()[0] in ("word", "punct", "string", "number") and tokens.peek() not in (("punct", ","), ("punct", ")")):
        tokens.next()  # index options: USING BTREE, KEY_BLOCK_SIZE=n, COMMENT '...', VISIBLE
    return columns


def _column(tokens: _Tokens, table: Table) -> None:
    name = tokens.name("a column name")
    column = Column(name, _type(tokens, name))
    table.columns.append(column)
    while True:
        kind, text = tokens.peek()
        upper = text.upper() if kind == "word" else ""
        if kind != "word":
            break
        if tokens.words("NOT", "NULL"):
            column.not_null = True
        elif tokens.word("NULL"):
            column.not_null = False
        elif tokens.word("DEFAULT"):
            _default(tokens, column)
        elif tokens.word("AUTO_INCREMENT"):
            column.auto_increment = True
        elif tokens.words("PRIMARY", "KEY") or tokens.word("KEY"):
            table.indexes.append(Index("PRIMARY", [name], True))
        elif tokens.word("UNIQUE"):
            tokens.word("KEY")
            table.indexes.append(Index(name, [name], True))
        elif tokens.word("COMMENT"):
            tokens.next()
        elif tokens.words("CHARACTER", "SET") or tokens.word("CHARSET", "COLLATE", "COLUMN_FORMAT", "STORAGE"):
            tokens.next()
        elif tokens.word("BINARY", "ASCII", "UNICODE", "VISIBLE", "INVISIBLE"):
            pass
        elif upper in ("ON", "GENERATED", "AS", "REFERENCES", "CHECK", "VIRTUAL", "PERSISTENT", "STORED"):
            raise InvalidArgument(f"column {name}: {upper} cannot be mapped onto SQLite")
        else:
            raise InvalidArgument(f"column {name}: unexpected {text!r}")


def _type(tokens: _Tokens, column: str) -> str:
    kind, text = tokens.next()
    if kind != "word":
        raise InvalidArgument(f"column {column}: expected a type, found {text or 'the end'!r}")
    base = text.lower()
    if base in ("bool", "boolean"):
        return "tinyint(1)"
    if base == "double" and tokens.word("PRECISION"):
        pass
    if base in ("character", "national", "nchar", "nvarchar"):
        varying = tokens.word("VARYING")
        if base in ("national",):
            varying = tokens.word("VARCHAR") or (tokens.word("CHAR", "CHARACTER") and tokens.word("VARYING"))
        base = "varchar" if varying or base == "nvarchar" else "char"
    base = _ALIASES.get(base, base)
    if base not in _INTEGERS and base not in _OTHER_TYPES:
        raise InvalidArgument(f"column {column}: type {text} cannot be mapped onto SQLite")
    args: list[str] = []
    if tokens.punct("("):
        for kind, value in tokens.balanced():
            if kind == "number" or kind == "string":
                args.append(value if kind == "number" else "'" + string_value(value).replace("'", "''") + "'")
            elif (kind, value) != ("punct", ","):
                raise InvalidArgument(f"column {column}: unexpected {value!r} in the type")
    unsigned = zerofill = False
    while True:
        if tokens.word("UNSIGNED"):
            unsigned = True
        elif tokens.word("ZEROFILL"):
            zerofill = unsigned = True
        elif tokens.word("SIGNED"):
            pass
        else:
            break
    if base in _NEEDS_LENGTH and not args:
        raise InvalidArgument(f"column {column}: {base} needs a length")
    if base in _INTEGERS and not args:
        args = [_INTEGERS[base][2 if unsigned else 1]]
    elif base == "decimal" and not args:
        args = ["10", "0"]
    elif base in ("char", "binary") and not args:
        args = ["1"]
    rendered = base + (f"({','.join(args)})" if args else "")
    if unsigned and (base in _INTEGERS or base in ("decimal", "float", "double")):
        rendered += " unsigned"
    if zerofill:
        rendered += " zerofill"
    return rendered


def _default(tokens: _Tokens, column: Column) -> None:
    sign = ""
    if tokens.punct("-"):
        sign = "-"
    elif tokens.punct("+"):
        pass
    kind, text = tokens.next()
    if kind == "number":
        column.default = sign + text
    elif kind == "string":
        column.default = string_value(text)
    elif kind == "word" and text.upper() == "NULL":
        column.default = None
    elif kind == "word" and text.upper() in ("TRUE", "FALSE"):
        column.default = "1" if text.upper() == "TRUE" else "0"
    elif kind == "word" and text.upper() in ("CURRENT_TIMESTAMP", "NOW", "LOCALTIMESTAMP"):
        if tokens.punct("("):
            tokens.balanced()
        column.default, column.default_is_expression = "current_timestamp()", True
    else:
        raise InvalidArgument(f"column {column.name}: a DEFAULT of {text!r} cannot be mapped onto SQLite")


def _table_options(tokens: _Tokens) -> None:
    while True:
        kind, text = tokens.next()
        if kind == "end" or (kind, text) == ("punct", ";"):
            return
        if kind == "word" and text.upper() == "PARTITION":
            raise InvalidArgument("PARTITION BY cannot be mapped onto SQLite")
        if (kind, text) == ("punct", "("):
            tokens.balanced()  # UNION=(...)


# Output ---------------------------------------------------------------------------------------

def quote_sqlite(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_literal(value: str) -> str:
    if re.fullmatch(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?", value):
        return value
    return "'" + value.replace("'", "''") + "'"


def sqlite_index_name(table: str, index: str) -> str:
    """SQLite index names are per database, MySQL's per table: ours are <table>__<index>."""
    return f"{table}__{index}"


def sqlite_statements(table: Table, name: Optional[str] = None) -> list[str]:
    """CREATE TABLE and CREATE INDEX statements that make this table in SQLite."""
    name = name or table.name
    lines, primary = [], next((i for i in table.indexes if i.primary), None)
    for c in table.columns:
        if c.auto_increment:
            lines.append(f"{quote_sqlite(c.name)} {AUTOINCREMENT_TYPE} PRIMARY KEY AUTOINCREMENT")
            primary = None
            continue
        line = f"{quote_sqlite(c.name)} {quote_sqlite(c.type)}"
        if c.not_null:
            line += " NOT NULL"
        if c.default_is_expression:
            line += " DEFAULT CURRENT_TIMESTAMP"
        elif c.default is not None:
            line += f" DEFAULT {_sql_literal(c.default)}"
        lines.append(line)
    if primary is not None:
        lines.append(f"PRIMARY KEY ({', '.join(quote_sqlite(c) for c in primary.columns)})")
    statements = [f"CREATE TABLE {quote_sqlite(name)} (\n  " + ",\n  ".join(lines) + "\n)"]
    for index in table.indexes:
        if index.primary:
            continue
        statements.append(
            f"CREATE {'UNIQUE ' if index.unique else ''}INDEX {quote_sqlite(sqlite_index_name(name, index.name))} "
            f"ON {quote_sqlite(name)} ({', '.join(quote_sqlite(c) for c in index.columns)})"
        )
    return statements


def _quote_mysql(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def show_create_table(table: Table) -> str:
    """The table as MariaDB's SHOW CREATE TABLE prints one (without the storage options, which
    SQLite does not have); feeding it back to POST /dbs/<db>/tables makes the same table."""
    lines = []
    for c in table.columns:
        line = f"{_quote_mysql(c.name)} {c.type}"
        if c.not_null:
            line += " NOT NULL"
        if c.default_is_expression:
            line += " DEFAULT current_timestamp()"
        elif c.default is not None:
            line += f" DEFAULT {_sql_literal(c.default)}"
        elif not c.not_null:
            line += " DEFAULT NULL"
        if c.auto_increment:
            line += " AUTO_INCREMENT"
        lines.append(line)
    for index in table.indexes:
        columns = ",".join(_quote_mysql(c) for c in index.columns)
        if index.primary:
            lines.append(f"PRIMARY KEY ({columns})")
        else:
            lines.append(f"{'UNIQUE ' if index.unique else ''}KEY {_quote_mysql(index.name)} ({columns})")
    return f"CREATE TABLE {_quote_mysql(table.name)} (\n  " + ",\n  ".join(lines) + "\n)"


def show_columns(table: Table) -> list[dict]:
    """SHOW COLUMNS as the original answered it: name, type, null, key, default."""
    keys: dict[str, str] = {}
    for index in table.indexes:
        first = index.columns[0].lower()
        if index.primary:
            for c in index.columns:
                keys[c.lower()] = "PRI"
        elif index.unique and len(index.columns) == 1:
            keys.setdefault(first, "UNI")
        else:
            keys.setdefault(first, "MUL")
    return [{"name": c.name, "type": c.type, "null": "NO" if c.not_null else "YES",
             "key": keys.get(c.name.lower(), ""), "default": c.default} for c in table.columns]
