"""`python -m minivar.toy.eval`: mini-GenEval from the command line (the code is in geneval.py)."""
from .geneval import main

if __name__ == "__main__":
    main()
