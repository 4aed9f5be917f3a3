/* cache/body.c — message bodies, kept in memory up to a byte limit.
 *
 * A body never changes for a given (folder id, UIDVALIDITY, UID), so once
 * fetched it can be served again until memory is wanted for something else.
 * Three rules keep readers safe while other threads insert and drop:
 *
 *  - A reader holds a reference (cache_body_get / cache_body_insert) while it
 *    copies out of body->data, and reads data without the lock: data and len
 *    never change after insertion, only refs does, under the lock.
 *  - Only unreferenced bodies are evicted.  They sit on an LRU list ordered
 *    by the time they were last released (or stored); a referenced body is on
 *    no list at all, so eviction never has to step over bodies in use.
 *  - Dropping a referenced body (an EXPUNGE, a UIDVALIDITY change) takes it
 *    out of the hash so no new reader finds it, marks it doomed, and leaves
 *    the freeing to its last release.
 *
 * The byte total counts every body in memory, referenced and doomed ones
 * too, because that is what the limit is for; a body bigger than the limit
 * is still served, and goes as soon as its last reader lets go.
 *
 * cache_bodies_drop has no UIDVALIDITY, so it must find a uid under every
 * UIDVALIDITY the folder has bodies for.  A small per-folder record of those
 * ("generations", almost always exactly one) turns that into one hash lookup
 * each instead of a scan of every body.
 *
 * The bodies are found through an open-addressed table with the keys
 * inline (linear probing, at most half full, removal by shifting back the
 * entries after the hole: no tombstones).  A lookup reads one or two cache
 * lines; uthash's chains cost a cache miss per node, and a scan looks up
 * every message two or three times (4-5 % of the daemon's CPU in a grep). */

/* uthash (the per-folder records) on out of memory: NULL, not exit().
 * After a failed HASH_ADD the item's hh.tbl is NULL. */
#define HASH_NONFATAL_OOM 1
#include "cache/cache.h"

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

/* One slot of the index; body NULL: free. */
struct index_slot {
    uint32_t folder_id, uidvalidity, uid;
    struct cache_body *body;
};

/* What the public struct has no room for.  body comes first so that a
 * struct cache_body pointer handed out converts back. */
struct stored_body {
    struct cache_body body;
    bool doomed;            /* dropped while referenced: free at last release */
};

struct folder_generation {
    uint32_t uidvalidity;
    size_t bodies;          /* how many bodies in the hash have it */
    struct folder_generation *next;
};

struct folder_bodies {
    uint32_t folder_id;
    struct folder_generation *generations;
    UT_hash_handle hh;
};

struct cache_bodies {
    pthread_mutex_t lock;               /* protects everything below and every refs */
    struct index_slot *slots;           /* the index: capacity a power of two */
    size_t capacity, indexed;
    struct folder_bodies *by_folder;    /* uthash on folder_id */
    struct cache_body *lru_oldest;      /* unreferenced bodies in the hash, */
    struct cache_body *lru_newest;      /*   oldest release first */
    struct cache_body *doomed;          /* dropped but still referenced; linked
                                           through lru_prev/lru_next */
    uint64_t bytes;                     /* data held, all bodies, doomed too */
    size_t count;
    uint64_t limit;
};

static struct stored_body *stored(struct cache_body *body)
{
    return (struct stored_body *)body;
}

static void lock_bodies(struct cache_bodies *bodies)
{
    int rc = pthread_mutex_lock(&bodies->lock);
    if (rc != 0) {
        fprintf(stderr, "imapfs: body cache lock: error %d\n", rc);
        abort();
    }
}

static void unlock_bodies(struct cache_bodies *bodies)
{
    pthread_mutex_unlock(&bodies->lock);
}

/* ------------------------------------------------------------------ lists */

static void lru_unlink(struct cache_bodies *bodies, struct cache_body *body)
{
    if (body->lru_prev)
        body->lru_prev->lru_next = body->lru_next;
    else
        bodies->lru_oldest = body->lru_next;
    if (body->lru_next)
        body->lru_next->lru_prev = body->lru_prev;
    else
        bodies->lru_newest = body->lru_prev;
    body->lru_prev = body->lru_next = NULL;
}

static void lru_push_newest(struct cache_bodies *bodies, struct cache_body *body)
{
    body->lru_next = NULL;
    body->lru_prev = bodies->lru_newest;
    if (bodies->lru_newest)
        bodies->lru_newest->lru_next = body;
    else
        bodies->lru_oldest = body;
    bodies->lru_newest = body;
}

static void doomed_push(struct cache_bodies *bodies, struct cache_body *body)
{
    body->lru_prev = NULL;
    body->lru_next = bodies->doomed;
    if (bodies->doomed)
        bodies->doomed->lru_prev = body;
    bodies->doomed = body;
}

static void doomed_unlink(struct cache_bodies *bodies, struct cache_body *body)
{
    if (body->lru_prev)
        body->lru_prev->lru_next = body->lru_next;
    else
        bodies->doomed = body->lru_next;
    if (body->lru_next)
        body->lru_next->lru_prev = body->lru_prev;
    body->lru_prev = body->lru_next = NULL;
}

/* ------------------------------------------------------------ generations */

static struct folder_bodies *find_folder(struct cache_bodies *bodies, uint32_t folder_id)
{
    struct folder_bodies *folder;
    HASH_FIND(hh, bodies->by_folder, &folder_id, sizeof folder_id, folder);
    return folder;
}

/* Counts one more body for (folder_id, uidvalidity).  0 or -ENOMEM. */
static int generation_add(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uidvalidity)
{
    struct folder_bodies *folder = find_folder(bodies, folder_id);
    bool new_folder = false;
    if (!folder) {
        folder = calloc(1, sizeof *folder);
        if (!folder)
            return -ENOMEM;
        folder->folder_id = folder_id;
        new_folder = true;
    }

    struct folder_generation *generation = folder->generations;
    while (generation && generation->uidvalidity != uidvalidity)
        generation = generation->next;
    if (!generation) {
        generation = calloc(1, sizeof *generation);
        if (!generation) {
            if (new_folder)
                free(folder);
            return -ENOMEM;
        }
        generation->uidvalidity = uidvalidity;
        generation->next = folder->generations;
        folder->generations = generation;
    }

    if (new_folder) {
        HASH_ADD(hh, bodies->by_folder, folder_id, sizeof folder->folder_id, folder);
        if (!folder->hh.tbl) {
            free(generation);
            free(folder);
            return -ENOMEM;
        }
    }
    generation->bodies++;
    return 0;
}

static void generation_remove(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uidvalidity)
{
    struct folder_bodies *folder = find_folder(bodies, folder_id);
    if (!folder)
        return;
    struct folder_generation **link = &folder->generations;
    while (*link && (*link)->uidvalidity != uidvalidity)
        link = &(*link)->next;
    struct folder_generation *generation = *link;
    if (!generation || --generation->bodies > 0)
        return;
    *link = generation->next;
    free(generation);
    if (!folder->generations) {
        HASH_DEL(bodies->by_folder, folder);
        free(folder);
    }
}

/* ----------------------------------------------------------------- bodies */

static size_t home_slot(size_t capacity, uint32_t folder_id, uint32_t uidvalidity, uint32_t uid)
{
    uint64_t h = (((uint64_t)folder_id << 32) | uid) * 0x9e3779b97f4a7c15ull;
    h ^= uidvalidity * 0xc2b2ae3d27d4eb4full;
    return (size_t)(h >> 32) & (capacity - 1);
}

static bool slot_is(const struct index_slot *slot, uint32_t folder_id, uint32_t uidvalidity,
                    uint32_t uid)
{
    return slot->uid == uid && slot->folder_id == folder_id && slot->uidvalidity == uidvalidity;
}

static struct cache_body *find_body(struct cache_bodies *bodies, uint32_t folder_id,
                                    uint32_t uidvalidity, uint32_t uid)
{
    if (!bodies->capacity)
        return NULL;
    size_t mask = bodies->capacity - 1;
    for (size_t i = home_slot(bodies->capacity, folder_id, uidvalidity, uid);; i = (i + 1) & mask) {
        struct index_slot *slot = &bodies->slots[i];
        if (!slot->body)
            return NULL;
        if (slot_is(slot, folder_id, uidvalidity, uid))
            return slot->body;
    }
}

/* Puts body in a free slot of slots (not in the table already). */
static void place(struct index_slot *slots, size_t capacity, struct cache_body *body)
{
    size_t i = home_slot(capacity, body->folder_id, body->uidvalidity, body->uid);
    while (slots[i].body)
        i = (i + 1) & (capacity - 1);
    slots[i] = (struct index_slot){ body->folder_id, body->uidvalidity, body->uid, body };
}

/* Indexes a body not in the index yet.  0 or -ENOMEM. */
static int index_add(struct cache_bodies *bodies, struct cache_body *body)
{
    if ((bodies->indexed + 1) * 2 > bodies->capacity) {
        size_t capacity = bodies->capacity ? bodies->capacity * 2 : 256;
        struct index_slot *slots = calloc(capacity, sizeof *slots);
        if (!slots)
            return -ENOMEM;
        for (size_t i = 0; i < bodies->capacity; i++)
            if (bodies->slots[i].body)
                place(slots, capacity, bodies->slots[i].body);
        free(bodies->slots);
        bodies->slots = slots;
        bodies->capacity = capacity;
    }
    place(bodies->slots, bodies->capacity, body);
    bodies->indexed++;
    return 0;
}

/* Takes body out of the index: the entries after it in its run move back
 * into the hole when their home slot allows, so that every entry stays
 * reachable from its home slot without tombstones. */
static void index_remove(struct cache_bodies *bodies, struct cache_body *body)
{
    size_t mask = bodies->capacity - 1;
    size_t hole = home_slot(bodies->capacity, body->folder_id, body->uidvalidity, body->uid);
    while (bodies->slots[hole].body != body)
        hole = (hole + 1) & mask;
    for (size_t next = (hole + 1) & mask; bodies->slots[next].body; next = (next + 1) & mask) {
        const struct index_slot *slot = &bodies->slots[next];
        size_t home = home_slot(bodies->capacity, slot->folder_id, slot->uidvalidity, slot->uid);
        /* next may move to the hole unless its home lies after the hole,
         * up to next (cyclically): then the hole is before its home */
        bool home_after_hole = hole <= next ? (home > hole && home <= next)
                                            : (home > hole || home <= next);
        if (!home_after_hole) {
            bodies->slots[hole] = *slot;
            hole = next;
        }
    }
    bodies->slots[hole] = (struct index_slot){ 0 };
    bodies->indexed--;
}

/* Takes body out of the index, so that nobody finds it any more. */
static void forget_body(struct cache_bodies *bodies, struct cache_body *body)
{
    index_remove(bodies, body);
    generation_remove(bodies, body->folder_id, body->uidvalidity);
}

static void free_body(struct cache_bodies *bodies, struct cache_body *body)
{
    bodies->bytes -= body->len;
    bodies->count--;
    free(body->data);
    free(stored(body));
}

static void evict_over_limit(struct cache_bodies *bodies)
{
    while (bodies->bytes > bodies->limit && bodies->lru_oldest) {
        struct cache_body *body = bodies->lru_oldest;
        lru_unlink(bodies, body);
        forget_body(bodies, body);
        free_body(bodies, body);
    }
}

/* Drops one body from the hash; freed now, or at its last release. */
static void drop_body(struct cache_bodies *bodies, struct cache_body *body)
{
    forget_body(bodies, body);
    if (body->refs > 0) {
        stored(body)->doomed = true;
        doomed_push(bodies, body);
    } else {
        lru_unlink(bodies, body);
        free_body(bodies, body);
    }
}

static void take_reference(struct cache_bodies *bodies, struct cache_body *body)
{
    if (body->refs++ == 0)
        lru_unlink(bodies, body);
}

static void release_locked(struct cache_bodies *bodies, struct cache_body *body)
{
    if (body->refs == 0) {
        /* A double release: the next one would free memory in use. */
        fprintf(stderr, "imapfs: cache_body_release of an unreferenced body\n");
        abort();
    }
    if (--body->refs > 0)
        return;
    if (stored(body)->doomed) {
        doomed_unlink(bodies, body);
        free_body(bodies, body);
        return;
    }
    lru_push_newest(bodies, body);
    evict_over_limit(bodies);
}

/* The body for the key, referenced; data taken over either way. */
static struct cache_body *insert_locked(struct cache_bodies *bodies, uint32_t folder_id,
                                        uint32_t uidvalidity, uint32_t uid, char *data,
                                        size_t len)
{
    struct cache_body *existing = find_body(bodies, folder_id, uidvalidity, uid);
    if (existing) {
        /* Two readers fetched the same message at once; the first one in wins. */
        free(data);
        take_reference(bodies, existing);
        return existing;
    }

    struct stored_body *entry = calloc(1, sizeof *entry);
    if (!entry) {
        free(data);
        return NULL;
    }
    struct cache_body *body = &entry->body;
    body->data = data;
    body->len = len;
    body->folder_id = folder_id;
    body->uidvalidity = uidvalidity;
    body->uid = uid;
    body->refs = 1;

    if (generation_add(bodies, folder_id, uidvalidity) < 0) {
        free(data);
        free(entry);
        return NULL;
    }
    if (index_add(bodies, body) < 0) {
        generation_remove(bodies, folder_id, uidvalidity);
        free(data);
        free(entry);
        return NULL;
    }
    bodies->bytes += len;
    bodies->count++;
    /* The new body is referenced, so this only makes room among the others. */
    evict_over_limit(bodies);
    return body;
}

/* ---------------------------------------------------------------- the API */

struct cache_bodies *cache_bodies_new(uint64_t limit)
{
    struct cache_bodies *bodies = calloc(1, sizeof *bodies);
    if (!bodies)
        return NULL;
    if (pthread_mutex_init(&bodies->lock, NULL) != 0) {
        free(bodies);
        return NULL;
    }
    bodies->limit = limit;
    return bodies;
}

void cache_bodies_free(struct cache_bodies *bodies)
{
    if (!bodies)
        return;
    /* Everything should be released by now; free what is not, rather than
     * leak it, since no reader can be left once the cache itself goes. */
    struct cache_body *body, *next_body;
    for (size_t i = 0; i < bodies->capacity; i++)
        if ((body = bodies->slots[i].body)) {
            free(body->data);
            free(stored(body));
        }
    free(bodies->slots);
    for (body = bodies->doomed; body; body = next_body) {
        next_body = body->lru_next;
        free(body->data);
        free(stored(body));
    }
    struct folder_bodies *folder, *next_folder;
    HASH_ITER(hh, bodies->by_folder, folder, next_folder) {
        HASH_DEL(bodies->by_folder, folder);
        while (folder->generations) {
            struct folder_generation *generation = folder->generations;
            folder->generations = generation->next;
            free(generation);
        }
        free(folder);
    }
    pthread_mutex_destroy(&bodies->lock);
    free(bodies);
}

struct cache_body *cache_body_get(struct cache_bodies *bodies, uint32_t folder_id,
                                  uint32_t uidvalidity, uint32_t uid)
{
    lock_bodies(bodies);
    struct cache_body *body = find_body(bodies, folder_id, uidvalidity, uid);
    if (body)
        take_reference(bodies, body);
    unlock_bodies(bodies);
    return body;
}

int cache_body_contains(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uidvalidity,
                        uint32_t uid)
{
    lock_bodies(bodies);
    int present = find_body(bodies, folder_id, uidvalidity, uid) != NULL;
    unlock_bodies(bodies);
    return present;
}

struct cache_body *cache_body_insert(struct cache_bodies *bodies, uint32_t folder_id,
                                     uint32_t uidvalidity, uint32_t uid, char *data, size_t len)
{
    lock_bodies(bodies);
    struct cache_body *body = insert_locked(bodies, folder_id, uidvalidity, uid, data, len);
    unlock_bodies(bodies);
    return body;
}

void cache_body_store(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uidvalidity,
                      uint32_t uid, char *data, size_t len)
{
    lock_bodies(bodies);
    struct cache_body *body = insert_locked(bodies, folder_id, uidvalidity, uid, data, len);
    if (body)
        release_locked(bodies, body);
    unlock_bodies(bodies);
}

void cache_body_release(struct cache_bodies *bodies, struct cache_body *body)
{
    if (!body)
        return;
    lock_bodies(bodies);
    release_locked(bodies, body);
    unlock_bodies(bodies);
}

void cache_bodies_drop(struct cache_bodies *bodies, uint32_t folder_id, uint32_t uid)
{
    lock_bodies(bodies);
    struct folder_bodies *folder = find_folder(bodies, folder_id);
    struct folder_generation *generation = folder ? folder->generations : NULL;
    while (generation) {
        /* Dropping may free this generation, and the folder with it when it
         * was the last: read what is needed first, and stop after the last. */
        struct folder_generation *next = generation->next;
        struct cache_body *body = find_body(bodies, folder_id, generation->uidvalidity, uid);
        if (body)
            drop_body(bodies, body);
        generation = next;
    }
    unlock_bodies(bodies);
}

void cache_bodies_drop_folder(struct cache_bodies *bodies, uint32_t folder_id)
{
    lock_bodies(bodies);
    /* Rare (a UIDVALIDITY change, a deleted folder): a full scan will do. */
    if (find_folder(bodies, folder_id)) {
        /* A removal moves later entries back, never before the hole: slot i
         * is looked at again after one. */
        for (size_t i = 0; i < bodies->capacity;) {
            struct cache_body *body = bodies->slots[i].body;
            if (body && body->folder_id == folder_id)
                drop_body(bodies, body);
            else
                i++;
        }
    }
    unlock_bodies(bodies);
}

void cache_bodies_usage(struct cache_bodies *bodies, uint64_t *bytes, size_t *count)
{
    lock_bodies(bodies);
    if (bytes)
        *bytes = bodies->bytes;
    if (count)
        *count = bodies->count;
    unlock_bodies(bodies);
}
