from cake_auth.cli import main

# Guarded: process-pool workers (libxcrypt hasher) import the main module again.
if __name__ == "__main__":
    main()
