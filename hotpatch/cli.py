"""The ``hotpatch`` command."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="hotpatch", description="Live patching of native functions in running Python processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="patch a function of a freshly built library, live")
    build = commands.add_parser("build", help="compile a C patch module against hotpatch.h")
    build.add_argument("source")
    build.add_argument("-o", "--output", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    # `hotpatch build fix.c -o fix.so -- -I...`: what follows -- goes to cc.
    cc_args = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:len(argv) - len(cc_args) - bool(cc_args or "--" in argv)])
    if args.command == "demo":
        from . import demo
        return demo.main()
    if args.command == "build":
        from .errors import HotpatchError
        from .module import build as build_module
        try:
            build_module(args.source, args.output, cc_args)
        except HotpatchError as e:
            print(f"hotpatch build: {e}", file=sys.stderr)
            return 1
        print(args.output)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
