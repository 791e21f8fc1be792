"""`python -m aaren`: how aaren was built and what it runs with."""
import argparse
import json
import os

from ._library import build_info


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m aaren", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--cmake-prefix-path", action="store_true",
                        help="print the CMAKE_PREFIX_PATH entry for find_package(aaren)")
    args = parser.parse_args()
    if args.cmake_prefix_path:
        print(os.path.dirname(os.path.abspath(__file__)))
        return
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return
    width = max(len(key) for key in info)
    print("aaren build report")
    for key, value in info.items():
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
