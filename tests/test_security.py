"""Nothing from a spec or its file name runs, and no generated file loses a user's file.

Structural: every string-valued field of a spec, and the spec's file name, is given
adversarial content (quotes of every kind, backslashes, newlines, NUL, lone surrogates,
control characters, code after a closing docstring). Each either exits 2 with one line,
writing nothing, or generates modules whose AST has the same statements as for a plain
string (only string constants may differ) and whose import creates no file (a canary).
"""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from symbackprop.cli import main

PAYLOADS = [
    '"""\nopen("CANARY_FILE", "w").write("ran")\n"""',
    "'''\nopen('CANARY_FILE', 'w')\n'''",
    'C:\\Users\\new\\tmp\\x',
    "a\\",
    "\\N{BULLET} \\x41 \\u0041 {0} %s {{ x }}",
    "nul\x00byte",
    "lone \ud800 surrogate \udfff",
    "esc \x1b[31m red \x07 bell \r\n crlf \t tab \x0b\x0c \x85 \u2028 \u2029",
    '"',
    "\"'`\u201c\u201d",
    "# comment\n    import os; os.system('touch CANARY_FILE')",
]

# Each field is (key path, plain value); the spec is built with the value substituted.
FIELDS: list[tuple[str, str]] = [
    ("name", "m"),
    ("description", "plain text"),
    ("input_name", "x"),
    ("dim", "N"),
    ("target_name", "t"),
    ("layer_name", "fc"),
    ("layer_type", "dense"),
    ("layer_input", "x"),
    ("activation", "tanh"),
    ("activation_type", "tanh"),
    ("activation_formula", "x*tanh(x)"),
    ("loss_type", "mse"),
    ("loss_prediction", "fc"),
    ("loss_target", "t"),
    ("loss_formula", "(y - t)**2"),
]


def spec_text(field: str, value: str) -> str:
    """A small valid spec with ``value`` (as a JSON-escaped YAML string) in ``field``."""
    v = {key: json.dumps(plain) for key, plain in FIELDS}
    v[field] = json.dumps(value)
    if field == "activation_type":
        act = f"{{type: {v['activation_type']}}}"
    elif field == "activation_formula":
        act = f"{{formula: {v['activation_formula']}}}"
    else:
        act = v["activation"]
    if field == "loss_formula":
        loss = f"{{formula: {v['loss_formula']}, target: {v['loss_target']}}}"
    else:
        loss = (f"{{type: {v['loss_type']}, prediction: {v['loss_prediction']}, "
                f"target: {v['loss_target']}}}")
    return "\n".join([
        f"name: {v['name']}",
        f"description: {v['description']}",
        f"inputs: {{{v['input_name']}: [{v['dim']}, 2]}}",
        f"targets: {{{v['target_name']}: [{v['dim']}, 1]}}",
        "layers:",
        f"  - {{name: {v['layer_name']}, type: {v['layer_type']}, input: {v['layer_input']}, "
        f"units: 1, activation: {act}}}",
        f"loss: {loss}",
        "",
    ])


def shape_of(source: str) -> str:
    """The module's AST with every string constant blanked: its statements."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = ""
    return ast.dump(tree)


@pytest.fixture(scope="module")
def plain_shapes(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("plain")
    spec = folder / "plain.yaml"
    spec.write_text(spec_text("description", "plain text"), encoding="utf-8")
    assert main(["generate", str(spec), "--out", str(folder / "out")]) == 0
    return {b: shape_of((folder / "out" / f"m_{b}.py").read_text(encoding="utf-8"))
            for b in ("numpy", "torch")}


def _generate_hostile(spec: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(["generate", str(spec), "--out", str(out)])
    err = capsys.readouterr().err
    return code, err


def _assert_safe(code: int, err: str, out: Path, plain_shapes: dict[str, str],
                 name: str = "m") -> None:
    assert "Traceback" not in err
    if code != 0:
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists(), "a refused spec wrote files"
        return
    for backend in ("numpy", "torch"):
        source = (out / f"{name}_{backend}.py").read_text(encoding="utf-8")
        assert shape_of(source) == plain_shapes[backend], f"{backend}: statements changed"
    res = subprocess.run(
        [sys.executable, "-c", f"import {name}_numpy, {name}_torch"], cwd=out,
        capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not (out / "CANARY_FILE").exists(), "importing the module ran spec text"


@pytest.mark.parametrize("field", [f for f, _ in FIELDS])
def test_every_string_field_is_escaped_or_refused(field, tmp_path, capsys, monkeypatch,
                                                   plain_shapes) -> None:
    monkeypatch.chdir(tmp_path)
    for n, payload in enumerate(PAYLOADS):
        spec = tmp_path / f"spec{n}.yaml"
        spec.write_text(spec_text(field, payload), encoding="utf-8")
        out = tmp_path / f"out{n}"
        code, err = _generate_hostile(spec, out, capsys)
        _assert_safe(code, err, out, plain_shapes)
        assert not (tmp_path / "CANARY_FILE").exists()


def test_descriptions_survive_exactly(tmp_path, capsys, plain_shapes) -> None:
    """An escaped description still says what it said: the docstring evaluates to it."""
    for n, payload in enumerate(PAYLOADS):
        spec = tmp_path / f"d{n}.yaml"
        spec.write_text(spec_text("description", payload), encoding="utf-8")
        out = tmp_path / f"o{n}"
        code, err = _generate_hostile(spec, out, capsys)
        assert code == 0, err
        doc = ast.get_docstring(ast.parse((out / "m_numpy.py").read_text("utf-8")),
                                clean=False)
        assert doc is not None and payload in doc


FILE_NAMES = ['a"""b.yaml', "x\\y.yaml", "q'\n'.yaml", "\x1b[31m.yaml", "\udcff.yaml",
              "sp ace\t\r.yaml", '"""\nopen("CANARY_FILE","w")\n""".yaml']


@pytest.mark.parametrize("index", range(len(FILE_NAMES)))
def test_hostile_file_names(index, tmp_path, capsys, monkeypatch, plain_shapes) -> None:
    monkeypatch.chdir(tmp_path)
    name = FILE_NAMES[index]
    spec = tmp_path / name
    spec.write_text(spec_text("description", "plain text"), encoding="utf-8")
    out = tmp_path / "out"
    code, err = _generate_hostile(spec, out, capsys)
    assert code == 0, err
    _assert_safe(code, err, out, plain_shapes)
    source = (out / "m_numpy.py").read_text(encoding="utf-8")
    # The file name is in the header, escaped, on one line.
    header = source.splitlines()[2]
    assert header.startswith("DO NOT EDIT: this file is generated from ")


# ---- generated-file safety -------------------------------------------------------------

SEED = Path(__file__).resolve().parents[1] / "examples" / "seed_mlp.yaml"


def test_new_files_follow_the_umask(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        assert main(["generate", str(SEED), "--out", str(tmp_path / "g")]) == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "g").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_regenerating_keeps_the_existing_mode(tmp_path) -> None:
    out = tmp_path / "g"
    assert main(["generate", str(SEED), "--out", str(out)]) == 0
    target = out / "seed_mlp_numpy.py"
    target.chmod(0o604)
    target.write_text(target.read_text() + "\n")  # stale, so it is rewritten
    assert main(["generate", str(SEED), "--out", str(out)]) == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o604


def test_quoting_the_header_does_not_make_a_file_generated(tmp_path, capsys) -> None:
    out = tmp_path / "g"
    out.mkdir()
    mine = out / "seed_mlp_numpy.py"
    text = ('# notes: files say "DO NOT EDIT: this file is generated from x.yaml"\n'
            "print('mine')\n")
    mine.write_text(text)
    assert main(["generate", str(SEED), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert mine.read_text() == text
    assert not (out / "seed_mlp_torch.py").exists(), "all or none"


def test_force_with_a_folder_in_the_way_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "g"
    (out / "seed_mlp_torch.py").mkdir(parents=True)
    assert main(["generate", str(SEED), "--out", str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert "seed_mlp_torch.py" in err and "folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["seed_mlp_torch.py"]


def test_unwritable_locations_name_the_path(tmp_path, capsys) -> None:
    for out in ("/proc/symbackprop-test", "/proc/self/status/x"):
        assert main(["generate", str(SEED), "--out", out]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert "/proc/" in err
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            assert main(["generate", str(SEED), "--out", str(ro)]) == 2
            assert str(ro) in capsys.readouterr().err
        finally:
            ro.chmod(0o700)


def test_latex_writes_only_regular_files_and_never_the_spec(tmp_path, capsys) -> None:
    spec = tmp_path / "seed.yaml"
    spec.write_bytes(SEED.read_bytes())
    fifo = tmp_path / "pipe.md"
    os.mkfifo(fifo)
    for target in (str(fifo), "/dev/null", str(spec)):
        assert main(["latex", str(spec), "-o", target]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and target in err
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert spec.read_bytes() == SEED.read_bytes()
    link = tmp_path / "alias.yaml"
    link.hardlink_to(spec)
    assert main(["latex", str(spec), "-o", str(link)]) == 2
    capsys.readouterr()
    assert main(["latex", str(spec), "-o", "-"]) == 0
    assert "fc1" in capsys.readouterr().out
    assert main(["latex", str(spec), "-o", str(tmp_path / "d.md")]) == 0
    assert (tmp_path / "d.md").read_text().strip()


def test_generate_never_overwrites_its_input(tmp_path, capsys) -> None:
    out = tmp_path / "g"
    out.mkdir()
    spec = out / "seed_mlp_numpy.py"  # a spec that happens to sit where the output goes
    spec.write_bytes(SEED.read_bytes())
    assert main(["generate", str(spec), "--out", str(out), "--force"]) == 2
    assert "input" in capsys.readouterr().err
    assert spec.read_bytes() == SEED.read_bytes()


@pytest.mark.parametrize("kind", ["fifo", "device", "folder"])
def test_spec_path_must_be_a_regular_file(kind, tmp_path, capsys) -> None:
    path = {"fifo": tmp_path / "spec.yaml", "device": Path("/dev/zero"),
            "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    res = subprocess.run([sys.executable, "-m", "symbackprop.cli", "generate", str(path),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "PYTHONPATH": str(
                             Path(__file__).resolve().parents[1] / "src")})
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and str(path) in res.stderr
    assert not (tmp_path / "o").exists()
