"""Load wirefault into plain mitmdump: `mitmdump --rawtcp ... -s <this file> --set fifo=PATH`.

mitmdump loads this file by path, so it imports the installed package by its full name.
"""

from wirefault.proxy.addon import WirefaultAddon

addons = [WirefaultAddon()]
