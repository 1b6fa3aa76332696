"""Modbus TCP/RTU: pure read planner and decoder beside a thin pymodbus adapter."""
