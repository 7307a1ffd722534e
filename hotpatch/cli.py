"""The ``hotpatch`` command."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="hotpatch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="patch a function of a freshly built library, live")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo
        return demo.main()
    return 2


if __name__ == "__main__":
    sys.exit(main())
