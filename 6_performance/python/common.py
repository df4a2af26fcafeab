"""Shared by the Python side of ipc_benchmark: argument parsing and the one-line report.

Each script in this folder is the Python multiprocessing version of one workload of
6_performance/ipc_benchmark.cpp, written to match the C++ (ipc_mp.cpp) line by line. It
takes --n (the workload's size) and prints one JSON object: {"workload", "value", "unit"}.
"""
import argparse
import json
import time


def size_argument(default):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=default)
    return parser.parse_args().n


def report(workload, value, unit):
    print(json.dumps({"workload": workload, "value": value, "unit": unit}), flush=True)


now = time.perf_counter
