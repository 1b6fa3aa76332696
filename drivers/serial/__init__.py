"""Serial line devices: pure framers and parsers (regex, struct, NMEA, SLCAN+DBC) beside one pyserial adapter.

Entry points: `SerialDriver` (driver.py) over `SerialPortConfig`s (config.py).
"""
