"""A config file with a misspelt key: the launcher must refuse it, naming the key."""

from tests.configs import tiny


def get_config():
    c = tiny.get_config()
    c.unlock()
    c.train.learning_rat = 0.1
    return c
