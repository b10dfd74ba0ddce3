from latentem.cli import main

if __name__ == "__main__":  # importing this module (as load's type lookup might) runs nothing
    raise SystemExit(main())
