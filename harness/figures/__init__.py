"""The paper's figures and analysis tables (`reproduce.py figure N`)."""
