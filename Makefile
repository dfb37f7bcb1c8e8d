.PHONY: setup demo test bench
setup: ; ./dev setup
demo: ; ./dev demo
test: ; ./dev test
bench: ; ./dev bench
