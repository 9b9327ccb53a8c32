CC ?= gcc
CFLAGS ?= -O3 -march=native
CFLAGS += -std=c11 -D_DEFAULT_SOURCE -Wall -Wextra -ffp-contract=fast
LDLIBS = -lm

ifeq ($(NO_OMP),1)
  CFLAGS += -Wno-unknown-pragmas
else
  OMP_OK := $(shell echo 'int main(void){return 0;}' | $(CC) -fopenmp -x c - -o /dev/null 2>/dev/null && echo 1)
  ifeq ($(OMP_OK),1)
    CFLAGS += -fopenmp
  else
    CFLAGS += -Wno-unknown-pragmas
  endif
endif

PROGS = train_unipool test_unipool

all: $(PROGS)

train_unipool: train_unipool.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

test_unipool: test_unipool.c train_unipool.c
	$(CC) $(CFLAGS) -o $@ $< $(LDLIBS)

test: test_unipool
	./test_unipool

clean:
	rm -f $(PROGS)

.PHONY: all test clean
