#!/usr/bin/env python
"""Entry point: ``python cli.py {fit,validate,test,predict} --config ...`` (same as ``vimssl``)."""

from vimssl.cli import console

if __name__ == "__main__":
    console()
