#include "emu_core.hpp"

#include <sys/mman.h>
#include <ucontext.h>

#include <stdexcept>
#include <string>

namespace emu {
namespace {

enum State { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
  ucontext_t context;
  jmp_buf jump;
  bool started = false;
  State state = RUNNABLE;
  unsigned tid = 0;
  char* stack = nullptr;
};

constexpr size_t kStack = 256 * 1024;
std::vector<Fiber> fibers;
std::vector<char*> stacks;
Fiber* current = nullptr;
jmp_buf scheduler;
const std::function<void()>* body = nullptr;
dim3 grid, block, block_index;
std::vector<unsigned char> shared_memory;
std::vector<uint64_t> warp_slots;
std::vector<int> warp_generation;

void entry() {
  (*body)();
  current->state = DONE;
  _longjmp(scheduler, 1);
}

void yield() {
  if (!_setjmp(current->jump)) _longjmp(scheduler, 1);
}

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "emu: %s (block %u)\n", what.c_str(), block_index.x);
  std::abort();
}

}  // namespace

long long launches = 0;

dim3 thread_idx() { return dim3(current->tid, 0, 0); }
dim3 block_idx() { return block_index; }
dim3 block_dim() { return block; }
dim3 grid_dim() { return grid; }
void* dynamic_shared() { return shared_memory.data(); }

void block_barrier() {
  current->state = AT_BARRIER;
  yield();
}

uint64_t shuffle_bits(uint64_t bits, int mode, int arg) {
  const unsigned warp = current->tid / 32, lane = current->tid % 32;
  warp_slots[warp * 32 + lane] = bits;
  current->state = AT_WARP;
  yield();  // every lane has written
  unsigned source = lane;
  if (mode == 0) source = lane + unsigned(arg) < 32 ? lane + unsigned(arg) : lane;
  else if (mode == 1) source = lane ^ unsigned(arg);
  else source = unsigned(arg) % 32;
  const uint64_t out = warp_slots[warp * 32 + source];
  current->state = AT_WARP;
  yield();  // every lane has read
  return out;
}

void run_grid(const Config& c, const std::function<void()>& kernel_body) {
  grid = c.grid;
  block = c.block;
  const unsigned threads = c.block.x * c.block.y * c.block.z;
  if (c.block.y != 1 || c.block.z != 1 || c.grid.y != 1 || c.grid.z != 1) fail("only 1-D launches are emulated");
  if (threads == 0 || threads > 1024) fail("bad block size " + std::to_string(threads));
  if (c.shared > 48 * 1024) fail("dynamic shared memory above 48 KB without opt-in: " + std::to_string(c.shared));
  body = &kernel_body;
  while (stacks.size() < threads) {
    void* s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) fail("mmap");
    stacks.push_back(static_cast<char*>(s));
  }
  const unsigned warps = (threads + 31) / 32;
  warp_slots.assign(size_t(warps) * 32, 0);
  for (unsigned b = 0; b < c.grid.x; ++b) {
    block_index = dim3(b, 0, 0);
    shared_memory.assign(c.shared + 64, 0xcd);  // garbage, as on a GPU
    fibers.assign(threads, Fiber{});
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& f = fibers[t];
      f.tid = t;
      f.stack = stacks[t];
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStack;
      f.context.uc_link = nullptr;
      makecontext(&f.context, entry, 0);
    }
    for (;;) {
      volatile bool ran = false;
      for (Fiber& f : fibers) {
        if (f.state != RUNNABLE) continue;
        ran = true;
        current = &f;
        if (!_setjmp(scheduler)) {
          if (!f.started) {
            f.started = true;
            setcontext(&f.context);
          } else {
            _longjmp(f.jump, 1);
          }
        }
      }
      // Releases.
      bool released = false, all_done = true, all_waiting_barrier = true;
      int at_barrier = 0;
      for (Fiber& f : fibers) {
        if (f.state != DONE) all_done = false;
        if (f.state == AT_BARRIER) ++at_barrier;
        else if (f.state != DONE) all_waiting_barrier = false;
      }
      if (all_done) break;
      for (unsigned w = 0; w < warps; ++w) {
        const unsigned first = w * 32, last = std::min(threads, first + 32);
        int waiting = 0, done = 0;
        for (unsigned t = first; t < last; ++t) {
          waiting += fibers[t].state == AT_WARP;
          done += fibers[t].state == DONE;
        }
        if (waiting == 0) continue;
        if (last - first != 32) fail("warp shuffle in a partial warp");
        if (waiting == 32) {
          for (unsigned t = first; t < last; ++t) fibers[t].state = RUNNABLE;
          released = true;
        } else if (done > 0 && waiting + done == int(last - first)) {
          fail("warp shuffle with exited lanes in warp " + std::to_string(w));
        }
      }
      if (!released && at_barrier > 0 && all_waiting_barrier) {
        for (Fiber& f : fibers)
          if (f.state == AT_BARRIER) f.state = RUNNABLE;
        released = true;
      }
      if (!ran && !released) {
        std::string states;
        for (Fiber& f : fibers) states += char('0' + f.state);
        fail("deadlock: thread states " + states.substr(0, 200));
      }
    }
  }
}

}  // namespace emu
