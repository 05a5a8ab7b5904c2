"""The `embedstore` command line: parse, call the embedstore library, print."""
