#!/usr/bin/env python3
"""Turns the CUDA sources (csrc/ops/cuda/: the kernels, their registration and their headers)
into host C++ for the emulator.

    make_emulated_kernel.py OUTPUT_DIR SOURCE.cu|.cpp... HEADER.cuh|.h...

Each SOURCE becomes OUTPUT_DIR/SOURCE_emulated.cpp, each header OUTPUT_DIR/ops/cuda/HEADER
(its path under csrc/), which the emulation's include path finds before the original. Every
output is its source, line for line (a #line directive maps every diagnostic and every
synchronization site the emulator reports back to the original file), with only these changes:
  - cuda_shim.h is included first by each source: it defines __global__, __device__, the warp
    intrinsics, __syncthreads and the parts of the CUDA runtime and c10/ATen CUDA helpers the
    host code uses, so the CUDA-only headers the sources include are dropped (each one must be
    in CUDA_HEADERS below, i.e. known to be covered by the shim);
  - every launch `kernel<<<grid, block, shared, stream>>>(args)` becomes
    `::emu::launch(kernel, ::emu::LaunchConfig{grid, block, shared, stream}, args)`;
  - every `extern __shared__ T name[];` becomes a pointer to the emulated block's dynamic
    shared memory;
  - the TORCH_LIBRARY_IMPL block (the dispatcher registration; exactly one, in a source) is
    removed: the test calls the kernels' entry points directly.
Anything else the emulator cannot handle (device code selected by __CUDA_ARCH__, a launch it
cannot parse, a CUDA header it does not know, a header beside the sources that is not converted
with them) stops the conversion with a message saying what changed, so the test never runs
something other than what the sources say.
"""
import os
import re
import sys

# CUDA-only headers whose declarations cuda_shim.h provides.
CUDA_HEADERS = {
    "ATen/cuda/CUDAContext.h",
    "c10/cuda/CUDAException.h",
    "c10/cuda/CUDAGuard.h",
    "cuda_runtime.h",
    "cuda_runtime_api.h",
}
# Include paths that are CUDA-only: every one included must be in CUDA_HEADERS.
CUDA_ONLY = re.compile(
    r"^(ATen/cuda/|ATen/native/cuda/|c10/cuda/|cuda|cub/|thrust/|cooperative_groups|curand|"
    r"cublas|cusparse|cufft|mma\.h|sm_\d+_intrinsics|crt/|nvtx|nv/)"
)
# Constructs the emulation has no answer for.
UNSUPPORTED = [
    (re.compile(r"\b__CUDA_ARCH__\b"), "__CUDA_ARCH__ (the emulation would compile the host branch)"),
    (re.compile(r"\bcooperative_groups\b"), "cooperative groups"),
    (re.compile(r"\b(atomic[A-Z]\w*|__threadfence\w*)\s*\("), "atomics / memory fences"),
    (re.compile(r"\b(__ballot_sync|__any_sync|__all_sync|__match_\w+|__reduce_\w+_sync|__activemask)\b"),
     "warp votes / reductions (add them to cuda_shim.h first)"),
    (re.compile(r"\bcudaLaunch\w*\s*\("), "cudaLaunchKernel and friends (only <<<>>> launches are converted)"),
]


class ShapeError(Exception):
    pass


def fail(path, message):
    sys.stderr.write(
        f"make_emulated_kernel.py: {path} no longer has the shape the CUDA emulation expects:\n"
        f"  {message}\n"
        "Update tests/cuda_emulation/make_emulated_kernel.py (and cuda_shim.h) to match, so that "
        "the emulation test keeps running the kernels as the sources write them.\n")
    sys.exit(1)


def blank_out(text):
    """The text's newlines only: removed code keeps the line numbering."""
    return "\n" * text.count("\n")


def strip_comments_and_strings(src):
    """Source with comments and string/char literals replaced by spaces (same offsets)."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def matching(code, start, open_char, close_char):
    """Index just past the bracket that closes the one at `start` (in comment-free code)."""
    depth = 0
    for i in range(start, len(code)):
        if code[i] == open_char:
            depth += 1
        elif code[i] == close_char:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ShapeError(f"unbalanced '{open_char}' at offset {start}")


def line_of(src, offset):
    return src.count("\n", 0, offset) + 1


def split_top_level(text):
    """Splits at commas outside (), [], {} and template-looking <>; returns stripped parts."""
    parts, depth, current = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(c)
    last = "".join(current).strip()
    if last:
        parts.append(last)
    return parts


def convert_includes(src, code, path):
    edits = []
    for m in re.finditer(r'^[ \t]*#[ \t]*include[ \t]*[<"]([^>"]+)[>"][^\n]*', code, re.M):
        header = m.group(1)
        if CUDA_ONLY.match(header):
            if header not in CUDA_HEADERS:
                raise ShapeError(
                    f"line {line_of(src, m.start())}: includes <{header}>, a CUDA header the "
                    "emulation does not know; add what the source uses from it to cuda_shim.h and "
                    "the name to CUDA_HEADERS")
            edits.append((m.start(), m.end(), f"// (CUDA emulation: <{header}> is cuda_shim.h)"))
    return edits


def convert_launches(src, code, path):
    edits = []
    for m in re.finditer(r"<<<", code):
        # The callee: an id-expression, possibly qualified, possibly with template arguments.
        end_callee = m.start()
        i = end_callee
        while True:
            while i > 0 and code[i - 1] in " \t\n":
                i -= 1
            if i > 0 and code[i - 1] == ">":  # template arguments: walk back to their '<'
                depth = 0
                j = i - 1
                while j >= 0:
                    if code[j] == ">":
                        depth += 1
                    elif code[j] == "<":
                        depth -= 1
                        if depth == 0:
                            break
                    j -= 1
                if j < 0:
                    raise ShapeError(f"line {line_of(src, m.start())}: cannot parse the kernel "
                                     "name before <<<")
                i = j
                continue
            k = i
            while k > 0 and (code[k - 1].isalnum() or code[k - 1] in "_:"):
                k -= 1
            if k == i:
                raise ShapeError(f"line {line_of(src, m.start())}: no kernel name before <<<")
            i = k
            break
        callee_start = i
        close = code.find(">>>", m.end())
        if close < 0:
            raise ShapeError(f"line {line_of(src, m.start())}: <<< without >>>")
        config = src[m.end():close]
        if "<<<" in code[m.end():close]:
            raise ShapeError(f"line {line_of(src, m.start())}: nested <<<")
        n_config = len(split_top_level(code[m.end():close]))
        if not 2 <= n_config <= 4:
            raise ShapeError(f"line {line_of(src, m.start())}: a launch configuration of "
                             f"{n_config} arguments")
        j = close + 3
        while j < len(code) and code[j] in " \t\n":
            j += 1
        if j >= len(code) or code[j] != "(":
            raise ShapeError(f"line {line_of(src, m.start())}: no argument list after >>>")
        args_end = matching(code, j, "(", ")")
        args = src[j + 1:args_end - 1]
        callee = src[callee_start:end_callee]
        replacement = (f"::emu::launch({callee}, ::emu::LaunchConfig{{{config}}}"
                       + (f", {args}" if args.strip() else "") + ")")
        # Keep the line count of the original launch.
        lines_before = src.count("\n", callee_start, args_end)
        lines_after = replacement.count("\n")
        if lines_after < lines_before:
            replacement += "\n" * (lines_before - lines_after)
        edits.append((callee_start, args_end, replacement))
    return edits


def convert_shared(src, code, path):
    edits = []
    pattern = re.compile(
        r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_][\w:\s<>,]*?)\s+"
        r"(?:__align__\s*\(\s*\d+\s*\)\s+)?([A-Za-z_]\w*)\s*\[\s*\]\s*;")
    for m in pattern.finditer(code):
        element = " ".join(m.group(1).split())
        name = m.group(2)
        edits.append((m.start(), m.end(),
                      f"{element}* const {name} = static_cast<{element}*>(::emu::dynamic_shared_memory());"))
    leftover = [mm.start() for mm in re.finditer(r"\bextern\s+__shared__", code)]
    converted = {e[0] for e in edits}
    for start in leftover:
        if start not in converted:
            raise ShapeError(f"line {line_of(src, start)}: an extern __shared__ declaration of a "
                             "form the converter does not know")
    return edits


def convert_registration(src, code, path):
    found = list(re.finditer(r"\bTORCH_LIBRARY_IMPL\s*\(", code))
    if len(found) != 1:
        raise ShapeError(f"expected exactly one TORCH_LIBRARY_IMPL block (the CUDA registration), "
                         f"found {len(found)}")
    m = found[0]
    paren_end = matching(code, m.end() - 1, "(", ")")
    brace = code.find("{", paren_end)
    if brace < 0 or code[paren_end:brace].strip():
        raise ShapeError(f"line {line_of(src, m.start())}: TORCH_LIBRARY_IMPL(...) not followed by a block")
    end = matching(code, brace, "{", "}")
    return [(m.start(), end, "// (CUDA emulation: the dispatcher registration is not compiled)"
             + blank_out(src[m.start():end]))]


def check_supported(src, code, path, what):
    for pattern, name in UNSUPPORTED:
        m = pattern.search(code)
        if m:
            raise ShapeError(f"{what} line {line_of(src, m.start())}: uses {name}")


def local_includes(src, code, path, csrc):
    """The project headers the source includes from the CUDA sources' own directory."""
    found = []
    here = os.path.dirname(path)
    # Directives found in the code (not in comments), names read from the source (the code
    # has its strings blanked).
    for m in re.finditer(r"^[ \t]*#[ \t]*include\b", code, re.M):
        name = re.match(r'[ \t]*"([^"]+)"', src[m.end():])
        if not name:
            continue
        for root in [here, csrc]:
            candidate = os.path.normpath(os.path.join(root, name.group(1)))
            if os.path.isfile(candidate):
                if os.path.dirname(candidate) == here:
                    found.append((candidate, line_of(src, m.start())))
                break
    return found


def convert(path, csrc, sources, is_header):
    """One file's rewrites: (converted text, launches, TORCH_LIBRARY_IMPL blocks, kernels)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    code = strip_comments_and_strings(src)
    name = os.path.basename(path)
    try:
        check_supported(src, code, path, name)
        for header, line in local_includes(src, code, path, csrc):
            if header not in sources:
                raise ShapeError(f"{name} line {line}: includes {os.path.basename(header)}, which is "
                                 "not converted with it (list it with the CUDA headers in CMakeLists.txt)")
        edits = []
        edits += convert_includes(src, code, path)
        launches = convert_launches(src, code, path)
        edits += launches
        edits += convert_shared(src, code, path)
        registrations = len(re.findall(r"\bTORCH_LIBRARY", code))
        if registrations and is_header:
            raise ShapeError(f"{name}: a dispatcher registration in a header")
        if registrations:
            edits += convert_registration(src, code, path)
    except ShapeError as e:
        fail(path, str(e))

    edits.sort()
    for (s1, e1, _), (s2, _, _) in zip(edits, edits[1:]):
        if s2 < e1:
            fail(path, f"overlapping rewrites at lines {line_of(src, s1)} and {line_of(src, s2)}")
    out, last = [], 0
    for start, end, replacement in edits:
        out.append(src[last:start])
        out.append(replacement)
        last = end
    out.append(src[last:])
    body = "".join(out)
    if body.count("\n") != src.count("\n"):
        fail(path, "internal error: the conversion changed the line count")
    converted_code = strip_comments_and_strings(body)
    if "<<<" in converted_code or ">>>" in converted_code:
        fail(path, "a <<< or >>> is left after the conversion")
    kernels = len(re.findall(r"\b__global__\b", code))
    return body, len(launches), registrations, kernels


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    output_dir = argv[1]
    sources = [os.path.abspath(a) for a in argv[2:]]
    here = os.path.dirname(sources[0])
    csrc = os.path.normpath(os.path.join(here, "..", ".."))
    outputs = []
    launches = registrations = kernels = 0
    for path in sources:
        if os.path.dirname(path) != here:
            fail(path, f"not in {here}, with the other CUDA sources")
        is_header = path.endswith((".cuh", ".h"))
        body, n_launches, n_registrations, n_kernels = convert(path, csrc, sources, is_header)
        launches += n_launches
        registrations += n_registrations
        kernels += n_kernels
        escaped = path.replace("\\", "\\\\").replace('"', '\\"')
        generated = f"// Generated by tests/cuda_emulation/make_emulated_kernel.py from {path}.\n"
        if is_header:
            # Found before the original by the emulation's include path (ops/cuda/... as in csrc/).
            target = os.path.join(output_dir, os.path.relpath(path, csrc))
            text = generated + f'#line 1 "{escaped}"\n' + body
        else:
            target = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0] + "_emulated.cpp")
            text = (generated + f"// {n_launches} kernel launch(es) converted.\n"
                    '#include "cuda_shim.h"\n' + f'#line 1 "{escaped}"\n' + body)
        outputs.append((target, text))
    sources_named = ", ".join(os.path.basename(p) for p in sources)
    if kernels == 0:
        fail(sources_named, "no __global__ function")
    if launches == 0:
        fail(sources_named, "no <<<...>>> kernel launch")
    if registrations != 1:
        fail(sources_named, "expected exactly one TORCH_LIBRARY_IMPL block (the CUDA registration), "
                            f"found {registrations}")
    for target, text in outputs:
        os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        tmp = target + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
