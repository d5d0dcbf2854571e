"""The databases domain's pure parts: MySQL DDL mapped onto SQLite, the LOAD DATA row reader,
gunzip, load options, the streaming multipart reader, and names."""

from __future__ import annotations

import gzip
import io
import sqlite3

import pytest

from tests.dbs_support import multipart as make_multipart
from wmgr.dbs import ddl, multipart
from wmgr.dbs.errors import IllegalOption, InvalidArgument
from wmgr.dbs.names import check_database, check_table, chunk_of, parse_chunk_id
from wmgr.dbs.rows import LoadOptions, RowReader, gunzip

QSERV_DDL = """-- a partitioner's schema file
CREATE TABLE `Source` (
  `sourceId` BIGINT(20) UNSIGNED NOT NULL AUTO_INCREMENT COMMENT 'the id',
  `objectId` bigint NULL,
  `flux` FLOAT(10,4) NOT NULL DEFAULT -1.5,
  `band` ENUM('u','g','r') CHARACTER SET ascii COLLATE ascii_bin NOT NULL DEFAULT 'r',
  `note` TEXT, `ok` BOOLEAN DEFAULT TRUE, `seen` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
  `price` DECIMAL, `raw` VARBINARY(8),
  PRIMARY KEY (`sourceId`),
  KEY `IDX_obj` USING BTREE (`objectId`, `flux` DESC) COMMENT 'x',
  INDEX (note(10))
) ENGINE=MyISAM AUTO_INCREMENT=5 DEFAULT CHARSET=latin1 /*!50100 PARTITION BY nothing */;"""


def sqlite_table(table: ddl.Table) -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    for statement in ddl.sqlite_statements(table):
        conn.execute(statement)
    return conn


def test_mysql_ddl_maps_types_keys_and_defaults() -> None:
    table = ddl.parse_create_table(QSERV_DDL)
    assert table.name == "Source"
    assert [(c.name, c.type, c.not_null, c.default) for c in table.columns] == [
        ("sourceId", "bigint(20) unsigned", True, None), ("objectId", "bigint(20)", False, None),
        ("flux", "float(10,4)", True, "-1.5"), ("band", "enum('u','g','r')", True, "r"),
        ("note", "text", False, None), ("ok", "tinyint(1)", False, "1"),
        ("seen", "timestamp", False, "current_timestamp()"), ("price", "decimal(10,0)", False, None),
        ("raw", "varbinary(8)", False, None)]
    assert [(i.name, i.columns, i.unique) for i in table.indexes] == [
        ("PRIMARY", ["sourceId"], True), ("IDX_obj", ["objectId", "flux"], False), ("note", ["note"], False)]
    conn = sqlite_table(table)
    conn.execute("INSERT INTO Source (objectId, note) VALUES ('12', 'n')")
    assert conn.execute("SELECT sourceId, typeof(objectId), flux, band, ok FROM Source").fetchall() == [
        (1, "integer", -1.5, "r", 1)]  # AUTO_INCREMENT, MySQL-typed affinity, defaults


def test_show_create_table_round_trips() -> None:
    table = ddl.parse_create_table(QSERV_DDL)
    shown = ddl.show_create_table(table)
    assert "`sourceId` bigint(20) unsigned NOT NULL AUTO_INCREMENT" in shown
    assert "`objectId` bigint(20) DEFAULT NULL" in shown and "KEY `IDX_obj` (`objectId`,`flux`)" in shown
    again = ddl.parse_create_table(shown)
    assert ddl.show_create_table(again) == shown


def test_show_columns_keys() -> None:
    table = ddl.parse_create_table(
        "CREATE TABLE t (a INT PRIMARY KEY, b INT UNIQUE, c INT, d INT, UNIQUE KEY cd (c, d), KEY (d))")
    assert [(c["name"], c["key"], c["null"]) for c in ddl.show_columns(table)] == [
        ("a", "PRI", "NO"), ("b", "UNI", "YES"), ("c", "MUL", "YES"), ("d", "MUL", "YES")]


def test_overlap_definition_has_no_unique_index() -> None:
    table = ddl.parse_create_table(QSERV_DDL).non_unique()
    assert [(i.name, i.unique) for i in table.indexes] == [
        ("PRIMARY_NON_UNIQUE", False), ("IDX_obj", False), ("note", False)]
    conn = sqlite_table(table)
    conn.executemany("INSERT INTO Source (sourceId, flux) VALUES (?, ?)", [(1, 0), (1, 0)])  # may repeat


def test_chunk_columns_replace_the_underscored_ones() -> None:
    table = ddl.parse_create_table("CREATE TABLE t (a INT, _chunkId INT, _subChunkId INT, chunkId INT, KEY (_chunkId))")
    changed = table.with_chunk_columns()
    assert changed.column_names() == ["a", "chunkId", "subChunkId"]
    assert changed.indexes == [] and changed.columns[2].type == "int(11)" and changed.columns[2].not_null


@pytest.mark.parametrize("sql, reason", [
    ("DROP TABLE t", "CREATE TABLE"),
    ("CREATE TEMPORARY TABLE t (a INT)", "TEMPORARY"),
    ("CREATE TABLE IF NOT EXISTS t (a INT)", "IF NOT EXISTS"),
    ("CREATE TABLE t LIKE u", "LIKE"),
    ("CREATE TABLE t (a INT) SELECT * FROM mysql.user", "SELECT"),
    ("CREATE TABLE t (a INT); DROP DATABASE x", "one statement"),
    ("CREATE TABLE t (g GEOMETRY)", "GEOMETRY cannot be mapped"),
    ("CREATE TABLE t (a INT, FOREIGN KEY (a) REFERENCES u (b))", "FOREIGN"),
    ("CREATE TABLE t (a INT, FULLTEXT KEY (a))", "FULLTEXT"),
    ("CREATE TABLE t (a INT ON UPDATE CURRENT_TIMESTAMP)", "ON cannot be mapped"),
    ("CREATE TABLE t (a INT AS (1))", "AS cannot be mapped"),
    ("CREATE TABLE t (a INT) PARTITION BY HASH(a)", "PARTITION"),
    ("CREATE TABLE t (a VARCHAR)", "needs a length"),
    ("CREATE TABLE t (a INT, UNIQUE KEY (a(4)))", "prefix"),
    ("CREATE TABLE t (a INT, a INT)", "twice"),
    ("CREATE TABLE t (a INT, KEY (b))", "does not have"),
    ("CREATE TABLE t (`a b` INT)", "Column name is invalid"),
    ("CREATE TABLE t (a INT AUTO_INCREMENT, b INT, PRIMARY KEY (a, b))", "AUTO_INCREMENT"),
])
def test_what_cannot_be_mapped_is_refused_with_the_reason(sql: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ddl.parse_create_table(sql)
    assert reason in caught.value.reason


def rows(text: str, pieces: int = 3, **options: str) -> list:
    """Every row, the text fed in pieces of `pieces` characters (records cross block ends)."""
    reader = RowReader(LoadOptions(**options))
    blocks = [text[i:i + pieces] for i in range(0, len(text), pieces)]
    return [row for batch in reader.rows(blocks) for row in batch]


def test_rows_plain_tab_separated() -> None:
    assert rows("1\ta\n2\tb\n") == [["1", "a"], ["2", "b"]]
    assert rows("1\ta\n2\tb") == [["1", "a"], ["2", "b"]]  # no final line end


def test_rows_escapes_and_null() -> None:
    assert rows("1\t\\N\ta\\tb\n2\tx\\\ny\t\\\\\n3\t\\0\\Z\t\\q\n") == [
        ["1", None, "a\tb"], ["2", "x\ny", "\\"], ["3", "\0\x1a", "q"]]


def test_rows_enclosed_fields() -> None:
    text = '1,"a,b",NULL\n2,"say ""hi""\nthere",\\N\n3,"NULL",""\n'
    assert rows(text, delimiter=",", enclose='"') == [
        ["1", "a,b", None], ["2", 'say "hi"\nthere', None], ["3", "NULL", ""]]


def test_rows_custom_terminators_and_no_escape() -> None:
    assert rows("1||a\\N;;2||b;;", delimiter="||", terminate=";;", escape="") == [["1", "a\\N"], ["2", "b"]]


def test_rows_cut_short_is_an_error() -> None:
    with pytest.raises(InvalidArgument):
        rows('1,"open\n', delimiter=",", enclose='"')


def test_load_options() -> None:
    assert LoadOptions.parse("") == LoadOptions()
    options = LoadOptions.parse("delimiter=%2C&enclose=%22&escape=&terminate=%0D%0A")
    assert (options.delimiter, options.enclose, options.escape, options.terminate) == (",", '"', "", "\r\n")
    assert LoadOptions.parse("compressed=None").gzipped("x.gz")  # WmgrClient's bug: guessed from the name
    assert not LoadOptions.parse("compressed=no").gzipped("x.gz")
    assert LoadOptions.parse("compressed=yes").gzipped("x")
    with pytest.raises(IllegalOption):
        LoadOptions.parse("delimiter=%2C&fields=1")
    for bad in ("delimiter=", "enclose=ab", "delimiter=%0A"):
        with pytest.raises(InvalidArgument):
            LoadOptions.parse(bad)


def test_gunzip_streams_members_and_refuses_garbage() -> None:
    data = gzip.compress(b"a" * 100000) + gzip.compress(b"b\n")
    assert b"".join(gunzip(data[i:i + 1000] for i in range(0, len(data), 1000))) == b"a" * 100000 + b"b\n"
    for bad in (b"not gzip", gzip.compress(b"x" * 1000)[:-5]):
        with pytest.raises(InvalidArgument):
            b"".join(gunzip([bad]))


def test_multipart_parts_in_either_order_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multipart, "BLOCK", 7)  # every boundary crosses a block end somewhere
    data = b"1\t2\r\n--part-X-of-the-multipart-request-not-quite\n"
    for first in (True, False):
        body, content_type = make_multipart(data, "t.gz", "delimiter=%2C", options_first=first)
        f = io.BytesIO(body)
        parts = multipart.scan(f, content_type.encode())
        assert parts["table-data"].filename == "t.gz"
        assert b"".join(multipart.read_blocks(f, parts["table-data"])) == data
        assert multipart.read_small(f, parts["load-options"], 100) == b"delimiter=%2C"


@pytest.mark.parametrize("body, content_type", [
    (b"--b\r\nContent-Disposition: form-data; name=x\r\n\r\nvalue\r\n", b"multipart/form-data; boundary=b"),
    (b"no boundary here", b"multipart/form-data; boundary=b"),
    (b"--b\r\n\r\nvalue\r\n--b--\r\n", b"multipart/form-data; boundary=b"),
    (b"--b--\r\n", b"text/plain"),
    (b"--b--\r\n", b"multipart/form-data"),
])
def test_multipart_refuses_broken_bodies(body: bytes, content_type: bytes) -> None:
    with pytest.raises(InvalidArgument):
        multipart.scan(io.BytesIO(body), content_type)


def test_names() -> None:
    assert check_database("qservTest_case01") == "qservTest_case01"
    for bad in ("", "1abc", "a-b", "a b", "a`b", "é", "a\n", "x" * 65):
        with pytest.raises(InvalidArgument):
            check_table(bad)
    assert chunk_of("Object", "Object_12") == (12, False)
    assert chunk_of("Object", "ObjectFullOverlap_12") == (12, True)
    assert chunk_of("Object", "Object_x") is None and chunk_of("Obj", "Object_1") is None
    assert parse_chunk_id(" 42 ") == 42
    for bad in ("-1", "1.5", "x", "", "99999999999", "١"):
        with pytest.raises(InvalidArgument):
            parse_chunk_id(bad)
