from cake_auth.entrypoints.cli import main

# Guarded: importing the module (e.g. a spawned worker process) must not start the CLI.
if __name__ == "__main__":
    main()
