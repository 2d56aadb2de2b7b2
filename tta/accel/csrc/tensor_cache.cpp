// A caching allocator for large CPU tensors: PyTorch's CPU allocator with freed blocks kept for reuse, by size class.
//
// Why: glibc places a freed 13 MB activation in a hole of its heap and later splits that hole for other sizes, so
// the pages a training step touches (its resident memory) grow well past the bytes it holds at any moment, and
// giving the pages back makes the next step fault them in again (tta/cpu_memory.py). Here every allocation of at
// least `threshold` bytes is its own mapping (mmap) of its size class (size_class: whole pages, at most 12.5 %
// over the request), and a freed one waits in a list of blocks of its class until a tensor of that class asks
// again; PyTorch's CUDA caching allocator does the same on a GPU. A repeating step (the same shapes every batch)
// then touches no fresh pages after its first batch and holds about the sum, over the size classes it uses, of the
// most blocks of that class alive at once.
//
// Bounds: when an allocation finds no free block of its class, free blocks are unmapped, least recently freed
// first, until mapped memory (live + cached) plus the new block is at most `max_cached_ratio` times the most live
// bytes ever held at once (so a change of shapes does not keep the old sizes forever). tta_tensor_cache_release
// unmaps every free block (as torch.cuda.empty_cache()). Smaller allocations go to c10::alloc_cpu as before.
// Every allocation and free is reported to PyTorch's profiler as the default allocator reports them.
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <iterator>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kPage = 4096;

struct FreeBlock {
    void* ptr;
    size_t size;
};

struct State {
    std::mutex mutex;
    std::atomic<size_t> threshold{size_t(1) << 20};  // read without the mutex by every allocation
    double max_cached_ratio = 2.0;
    std::unordered_map<void*, size_t> mapped;  // every block this allocator mapped -> its size
    std::list<FreeBlock> free_blocks;          // free blocks, least recently freed first
    std::unordered_map<size_t, std::vector<std::list<FreeBlock>::iterator>> free_by_size;
    // live_bytes, cached_bytes, peak_live_bytes, maps, unmaps, hits (reuse of a free block)
    int64_t counters[6] = {0, 0, 0, 0, 0, 0};
};

State& state() {
    static State* instance = new State();  // never destroyed: tensors may be freed during interpreter exit
    return *instance;
}

enum { LIVE, CACHED, PEAK, MAPS, UNMAPS, HITS };

// The block size for a request: rounded up to whole pages and to an eighth of the request's power of two (at most
// 12.5 % more address space; pages past the request are never touched, so they cost no resident memory), so that
// tensors of nearby sizes (a batch of another size, say) share blocks instead of each mapping its own.
size_t size_class(size_t nbytes) {
    size_t step = kPage;
    int top = 63 - __builtin_clzll((unsigned long long)nbytes);  // floor(log2(nbytes)); nbytes >= 1
    if (top - 3 > 12) step = size_t(1) << (top - 3);
    return (nbytes + step - 1) / step * step;
}

void unmap_oldest_free(State& s) {  // caller holds the mutex; free_blocks is not empty
    FreeBlock block = s.free_blocks.front();
    auto& same_size = s.free_by_size[block.size];
    same_size.erase(std::find(same_size.begin(), same_size.end(), s.free_blocks.begin()));
    if (same_size.empty()) s.free_by_size.erase(block.size);
    s.free_blocks.pop_front();
    s.mapped.erase(block.ptr);
    s.counters[CACHED] -= int64_t(block.size);
    s.counters[UNMAPS] += 1;
    munmap(block.ptr, block.size);
}

void* take_large(State& s, size_t size) {  // caller holds the mutex; nullptr when no mapping can be made
    auto found = s.free_by_size.find(size);
    if (found != s.free_by_size.end()) {  // the most recently freed block of this size (its pages are warmest)
        auto it = found->second.back();
        found->second.pop_back();
        if (found->second.empty()) s.free_by_size.erase(found);
        void* ptr = it->ptr;
        s.free_blocks.erase(it);
        s.counters[CACHED] -= int64_t(size);
        s.counters[HITS] += 1;
        return ptr;
    }
    double peak = double(std::max(s.counters[PEAK], s.counters[LIVE] + int64_t(size)));
    while (!s.free_blocks.empty() &&
           double(s.counters[LIVE] + s.counters[CACHED] + int64_t(size)) > s.max_cached_ratio * peak) {
        unmap_oldest_free(s);
    }
    void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ptr == MAP_FAILED) {  // out of address space or memory: give back every free block and try once more
        while (!s.free_blocks.empty()) unmap_oldest_free(s);
        ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (ptr == MAP_FAILED) return nullptr;
    }
    s.mapped.emplace(ptr, size);
    s.counters[MAPS] += 1;
    return ptr;
}

void delete_block(void* ptr) {
    if (ptr == nullptr) return;
    c10::profiledCPUMemoryReporter().Delete(ptr);
    State& s = state();
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        auto owned = s.mapped.find(ptr);
        if (owned != s.mapped.end()) {
            size_t size = owned->second;
            s.free_blocks.push_back({ptr, size});
            s.free_by_size[size].push_back(std::prev(s.free_blocks.end()));
            s.counters[LIVE] -= int64_t(size);
            s.counters[CACHED] += int64_t(size);
            return;
        }
    }
    c10::free_cpu(ptr);
}

struct TensorCacheAllocator final : c10::Allocator {
    c10::DataPtr allocate(size_t nbytes) override {
        State& s = state();
        void* ptr = nullptr;
        if (nbytes >= s.threshold.load(std::memory_order_relaxed)) {
            size_t size = size_class(nbytes);
            std::lock_guard<std::mutex> lock(s.mutex);
            ptr = take_large(s, size);
            if (ptr != nullptr) {
                s.counters[LIVE] += int64_t(size);
                s.counters[PEAK] = std::max(s.counters[PEAK], s.counters[LIVE]);
            }
        }
        if (ptr == nullptr) ptr = c10::alloc_cpu(nbytes);  // small, or no mapping possible (raises when out of memory)
        c10::profiledCPUMemoryReporter().New(ptr, nbytes);
        return {ptr, ptr, &delete_block, c10::Device(c10::DeviceType::CPU)};
    }

    c10::DeleterFnPtr raw_deleter() const override { return &delete_block; }

    void copy_data(void* dest, const void* src, std::size_t count) const override {
        default_copy_data(dest, src, count);
    }
};

// Never destroyed, like the state: PyTorch may still allocate or free during interpreter exit.
TensorCacheAllocator& allocator = *new TensorCacheAllocator();
c10::Allocator* previous = nullptr;
constexpr uint8_t kPriority = 1;  // above the default CPU allocator's registration (0)

// A fork while another thread holds the mutex would leave the child's copy locked forever (DataLoader workers).
void lock_for_fork() { state().mutex.lock(); }
void unlock_after_fork() { state().mutex.unlock(); }

}  // namespace

extern "C" {

// Make this PyTorch's CPU allocator (again) with these settings; 1 when it is in use afterwards.
int tta_tensor_cache_install(int64_t threshold, double max_cached_ratio) {
    static bool fork_handlers = false;
    State& s = state();
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        s.threshold.store(size_t(std::max<int64_t>(threshold, 1)));
        s.max_cached_ratio = max_cached_ratio;
        if (!fork_handlers) fork_handlers = pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork) == 0;
    }
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != &allocator) {
        previous = current;
        c10::SetCPUAllocator(&allocator, kPriority);
    }
    return c10::GetCPUAllocator() == &allocator;
}

// Hand PyTorch's CPU allocation back to the allocator that was in use before; blocks already handed out stay
// valid (their deleter is this library's). 1 when the previous allocator is in use afterwards.
int tta_tensor_cache_uninstall() {
    if (c10::GetCPUAllocator() == &allocator && previous != nullptr) c10::SetCPUAllocator(previous, kPriority);
    return c10::GetCPUAllocator() != &allocator;
}

int tta_tensor_cache_installed() { return c10::GetCPUAllocator() == &allocator; }

// live bytes, cached (free) bytes, peak live bytes, blocks mapped, blocks unmapped, reuses of a free block.
void tta_tensor_cache_counters(int64_t* out) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    std::copy(std::begin(s.counters), std::end(s.counters), out);
}

// Unmap every free block; returns the bytes given back.
int64_t tta_tensor_cache_release() {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    int64_t before = s.counters[CACHED];
    while (!s.free_blocks.empty()) unmap_oldest_free(s);
    return before;
}

}  // extern "C"
