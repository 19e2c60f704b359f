"""``python -m tierkernel``: launch the kernel (what the kernelspec's argv runs)."""

from tierkernel.kernel.app import main

if __name__ == "__main__":
    main()
